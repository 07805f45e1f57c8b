"""`pca_fit`: the whitened PCA of standardised vectors with which the heads fit (gate/train/fit.py) and the
router fit (gate/train/fit_router.py) project hidden states.

    mean, proj = pca_fit(x, k)     # x [N, D] -> mean [D], proj [D, k]; (x - mean) @ proj has unit variance

Deterministic: each component's largest-magnitude loading is made positive.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def pca_fit(hn: np.ndarray, n_pca: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and whitened projection [D, n_pca] of standardised hidden states."""
    x = torch.from_numpy(np.asarray(hn, dtype=np.float32))
    mean = x.mean(0)
    u, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    n_pca = min(n_pca, v.shape[0])
    scale = s[:n_pca] / math.sqrt(max(1, len(x) - 1))
    proj = v[:n_pca].T / scale.clamp_min(1e-6)
    # fix signs deterministically (largest-magnitude loading positive)
    sign = torch.sign(proj.gather(0, proj.abs().argmax(0, keepdim=True)))[0]
    return mean, proj * sign
