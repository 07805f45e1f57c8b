"""Training the heads by distillation from records: the word-completion head and the future-token heads.

The heads themselves (what they compute, how their inputs are indexed) live in gate/model/heads.py, which the
decoder loads; this module holds only what it takes to train them, so decoding never imports optimisers or
batching code. Both loops draw their batches from one seeded iterator (epochs are seeded permutations of the
rows), step one AdamW optimiser with warmup + cosine learning rate, and distil the big model: cross-entropy on
its argmax mixed with cross-entropy on its top-k distribution mapped into the restricted vocabulary, plus
EAGLE's feature regression towards its hidden state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gate.model.heads import FutureHeads, HiddenNorm, WordHead, context_ids


@dataclass
class HeadData:
    """Arrays of one split, as the heads need them (rows = record positions in file order)."""
    tokens: np.ndarray          # int64 [N] token at t
    argmax: np.ndarray          # int64 [N] big model's argmax at t (its choice for token t+1)
    hidden: np.ndarray          # [N, D] (fp16 memmap ok) big hidden at the drafter's layer
    run_start: np.ndarray       # int64 [N] first row of the contiguous run (same book, consecutive pos) of t
    topk_ids: np.ndarray | None = None   # int [N, k]
    topk_p: np.ndarray | None = None     # float [N, k]

    def __len__(self):
        return len(self.tokens)


def soft_targets(topk_ids, topk_p, rmap: torch.Tensor, n_out: int) -> torch.Tensor:
    """Big model's top-k distribution, renormalised, mapped onto R + other."""
    q = torch.zeros(topk_ids.shape[0], n_out)
    q.scatter_add_(1, rmap[topk_ids.long()], topk_p.float())
    return q / q.sum(1, keepdim=True).clamp_min(1e-8)


def distill_loss(logits, hard, soft=None, soft_weight: float = 0.5, pred_h=None, true_h=None,
                 reg_weight: float = 0.0):
    loss = F.cross_entropy(logits, hard)
    if soft is not None and soft_weight > 0:
        loss = (1 - soft_weight) * loss - soft_weight * (soft * F.log_softmax(logits, -1)).sum(-1).mean()
    if reg_weight > 0 and pred_h is not None:
        loss = loss + reg_weight * F.smooth_l1_loss(pred_h, true_h)
    return loss


def _lr_at(step, total, base, warmup=100):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def _batch_tensors(data: HeadData, t: np.ndarray, rmap: torch.Tensor, n_out: int, want_soft: bool):
    hard = rmap[torch.from_numpy(data.argmax[t].astype(np.int64))]
    soft = None
    if want_soft and data.topk_ids is not None:
        soft = soft_targets(torch.from_numpy(np.asarray(data.topk_ids[t], dtype=np.int64)),
                            torch.from_numpy(np.asarray(data.topk_p[t], dtype=np.float32)), rmap, n_out)
    return hard, soft


def _sorted_take(arr, idx):
    """arr[idx] for a memmap, reading rows in file order (much faster than random order), same result."""
    order = np.argsort(idx, kind="stable")
    out = np.asarray(arr[idx[order]])
    res = np.empty_like(out)
    res[order] = out
    return res


def _batches(rng, n_rows: int, batch: int, n_steps: int, desc: str):
    """(step, row indices, progress bar) for n_steps batches; epochs are seeded permutations of the rows."""
    order = np.empty(0, dtype=np.int64)
    bar = tqdm(range(n_steps), desc=desc, leave=False, mininterval=2)
    for step in bar:
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(n_rows)])
        b, order = order[:batch], order[batch:]
        yield step, b, bar


def _step(opt, loss, step: int, n_steps: int, lr: float, losses: list, bar) -> None:
    """One optimiser step at the scheduled learning rate; the progress bar shows the recent mean loss."""
    for g in opt.param_groups:
        g["lr"] = _lr_at(step, n_steps, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 50 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")


def n_steps_for(n_rows: int, epochs: float, batch: int, min_steps: int) -> int:
    return max(min_steps, int(math.ceil(epochs * n_rows / batch)))


def train_word_head(head: WordHead, norm: HiddenNorm, data: HeadData, rows: np.ndarray, rmap: torch.Tensor, *,
                    epochs: float = 2.0, batch: int = 512, lr: float = 2e-3, soft_weight: float = 0.5,
                    reg_weight: float = 1.0, min_steps: int = 0, seed: int = 0,
                    desc: str = "word head") -> list[float]:
    """Each epoch visits every row t once with s drawn uniformly from its valid range (deterministic).
    Loss: distillation on the big model's choice + reg_weight x smooth-L1 between the head's predicted hidden
    state and the big model's actual (standardised) hidden state at t (EAGLE's feature regression)."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    n_steps = n_steps_for(len(rows), epochs, batch, min_steps)
    head.train()
    losses = []
    # valid s for row t: 1..min(max_s, t - run_start[t])
    smax = np.minimum(head.max_s, rows - data.run_start[rows])
    keep = smax >= 1
    rows, smax = rows[keep], smax[keep]
    if len(rows) == 0:
        raise ValueError("no training positions with a previous position in the same run")
    for step, b, bar in _batches(rng, len(rows), batch, n_steps, desc):
        t = rows[b]
        s = 1 + (rng.random(len(b)) * smax[b]).astype(np.int64)
        ctx = torch.from_numpy(context_ids(data.tokens, data.run_start, t, head.n_ctx, head.pad))
        both = norm(torch.from_numpy(_sorted_take(data.hidden, np.concatenate([t - s, t])).astype(np.float32)))
        hn, hn_t = both[:len(t)], both[len(t):]
        hard, soft = _batch_tensors(data, t, rmap, head.n_out, soft_weight > 0)
        logits, pred_h = head(ctx, hn, torch.from_numpy(s), return_hidden=True)
        loss = distill_loss(logits, hard, soft, soft_weight, pred_h, hn_t, reg_weight)
        _step(opt, loss, step, n_steps, lr, losses, bar)
    head.eval()
    return losses


def train_future_heads(heads: FutureHeads, norm: HiddenNorm, data: HeadData, rows: np.ndarray,
                       rmap: torch.Tensor, *, epochs: float = 2.0, batch: int = 512, lr: float = 1e-3,
                       soft_weight: float = 0.5, reg_weight: float = 1.0, decay: float = 0.8, min_steps: int = 0,
                       seed: int = 0, desc: str = "future heads") -> list[float]:
    """Batches of p (hidden rows); head s is trained on argmax[p+s] where p+s is in the same run, plus
    reg_weight x smooth-L1 from its block's output to the big model's standardised hidden state at p+s."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.01)
    k = heads.k
    # p must have at least p+1 in the same run: run end = next run start - 1
    n = len(data)
    run_end = np.empty(n, dtype=np.int64)
    starts = np.unique(data.run_start)
    ends = np.append(starts[1:], n) - 1
    run_end[:] = ends[np.searchsorted(starts, data.run_start)]
    rows = rows[rows + 1 <= run_end[rows]]
    if len(rows) == 0:
        raise ValueError("no training positions with a next position in the same run")
    n_steps = n_steps_for(len(rows), epochs, batch, min_steps)
    heads.train()
    losses = []
    w = torch.tensor([decay ** j for j in range(k)])
    for step, b, bar in _batches(rng, len(rows), batch, n_steps, desc):
        p = rows[b]
        tgts = [p + j + 1 for j in range(k)]
        oks = [tg <= run_end[p] for tg in tgts]
        idx = np.concatenate([p] + [np.where(ok, tg, p) for tg, ok in zip(tgts, oks)])
        allh = norm(torch.from_numpy(_sorted_take(data.hidden, idx).astype(np.float32)))
        hn = allh[:len(p)]
        logits, pred_h = heads.forward_all(hn, return_hidden=True)   # [B, k, n_out], [B, k, D]
        loss = 0.0
        for j in range(k):
            ok = oks[j]
            if not ok.any():
                continue
            m = torch.from_numpy(ok)
            true_h = allh[(j + 1) * len(p):(j + 2) * len(p)][m]
            hard, soft = _batch_tensors(data, tgts[j][ok], rmap, heads.n_out, soft_weight > 0)
            loss = loss + w[j] * distill_loss(logits[m, j], hard, soft, soft_weight, pred_h[m, j], true_h,
                                              reg_weight)
        _step(opt, loss / w.sum(), step, n_steps, lr, losses, bar)
    heads.eval()
    return losses
