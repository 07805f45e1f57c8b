"""Training the feature head (gate/model/eagle.py) from records, and running it over records.

    info = train_feature_head(head, parts, dmap, cfg, ckpt, log)   # parts: (split, rows); timings, last losses
    out = run_levels(head, data, depth, rows=rows)    # per level d = since_big: rows t, draft token, p1, p2, entropy

Windows of `window` + 1 consecutive positions of one recorded run (window_starts, window_batch, eval_windows); the
loss (head_loss) sums over levels d = 1..depth, weighted 0.8^(d-1): cross-entropy on the big model's greedy token
(EAGLE-3: no feature regression).
Data, loss and why: docs/training.md#training-the-feature-head-gatetraineaglepy.

Resumable: a checkpoint (head, optimiser, epoch) is written atomically after every epoch under the fit's
stages folder; a re-run with the same settings and data continues from it.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gate.model.eagle import FeatureHead, draft_index
from gate.train.data import SplitData
from gate.train.distill import _lr_at

LEVEL_DECAY = 0.8


def window_starts(data: SplitData, L: int, offset: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
    """Start rows r of windows r..r+L inside one run, every L rows from `offset` past each run's start;
    with `rows`, only windows that lie entirely in those rows."""
    n = len(data)
    starts = np.flatnonzero(data.run_start == np.arange(n))
    ends = np.r_[starts[1:], n]
    out = [np.arange(a + offset, b - L, L) for a, b in zip(starts, ends)]
    r = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if rows is not None:
        ok = np.zeros(n + 1, dtype=np.int64)
        ok[rows] = 1
        inside = np.r_[0, np.cumsum(ok)]
        r = r[inside[r + L + 1] - inside[r] == L + 1]
    return r.astype(np.int64)


def window_batch(data: SplitData, starts: np.ndarray, L: int, dmap: torch.Tensor) -> dict:
    """Tensors of windows starting at `starts`: h [B, L, F] (the big model's states), next [B, L], label [B, L]
    (the big model's greedy token at +1, as a draft index; -100 outside the draft vocabulary), rows [B, L] (the
    record row of each label)."""
    idx = starts[:, None] + np.arange(L + 1)[None, :]
    h = torch.from_numpy(np.asarray(data.hidden[idx[:, :L].ravel()], dtype=np.float32)).view(len(starts), L, -1)
    tok = torch.from_numpy(data.tokens[idx])
    lab = dmap[torch.from_numpy(data.argmax[idx[:, 1:]])]
    return {"h": h, "next": tok[:, 1:], "label": lab, "rows": idx[:, 1:]}


def head_loss(head: FeatureHead, batch: dict, depth: int) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the big model's greedy token at every level (EAGLE-3 drops the feature regression)."""
    total, parts = 0.0, {}
    for d, out in enumerate(head(batch["h"], batch["next"], depth), 1):
        logits = head.logits(out[:, d - 1:])
        ce = F.cross_entropy(logits.flatten(0, 1), batch["label"][:, d - 1:].flatten(), ignore_index=-100)
        total = total + LEVEL_DECAY ** (d - 1) * ce
        parts[f"ce{d}"] = float(ce.detach())
    return total, parts


def train_feature_head(head: FeatureHead, parts: list[tuple[SplitData, np.ndarray | None]], dmap: torch.Tensor,
                       cfg, ckpt=None, log=print) -> dict:
    """Train `head` on windows of the given (split, rows) parts; `ckpt` (load, save) callables resume.
    Returns timings and the last losses."""
    L, B, depth = cfg.eagle_window, cfg.eagle_batch, cfg.eagle_depth
    g = torch.Generator().manual_seed(cfg.seed)
    n_windows = sum(len(window_starts(d, L, 0, r)) for d, r in parts)
    steps_per_epoch = max(1, n_windows // B)
    total = max(1, int(round(cfg.eagle_epochs * steps_per_epoch)))
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.eagle_lr, weight_decay=0.01)
    step, first_epoch = 0, 0
    if ckpt is not None and (state := ckpt.load()) is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, first_epoch = state["step"], state["epoch"]
        g.set_state(state["rng"])
        log(f"[fit] feature head: resuming after epoch {first_epoch} (step {step})")
    t0, first, last = time.time(), {}, {}
    n_epochs = int(np.ceil(cfg.eagle_epochs))
    bar = tqdm(total=total, initial=step, desc="feature head", mininterval=2)
    for epoch in range(first_epoch, n_epochs):
        offset = int(torch.randint(0, L, (1,), generator=g))
        order = [(i, s) for i, (d, r) in enumerate(parts) for s in window_starts(d, L, offset, r)]
        perm = torch.randperm(len(order), generator=g).tolist()
        head.train()
        for i in range(0, len(perm) - B + 1, B):
            if step >= total:
                break
            for grp in opt.param_groups:
                grp["lr"] = _lr_at(step, total, cfg.eagle_lr)
            loss, last = _step(head, opt, parts, [order[j] for j in perm[i:i + B]], L, dmap, depth)
            first = first or last
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", ce1=f"{last['ce1']:.3f}", refresh=False)
        head.eval()
        if ckpt is not None:
            ckpt.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch + 1,
                       "rng": g.get_state()})
    bar.close()
    return {"steps": step, "windows": n_windows, "train_s": round(time.time() - t0, 1), "first_losses": first,
            "last_losses": last}


def _step(head, opt, parts, picks, L, dmap, depth) -> tuple[float, dict]:
    batches = []
    for i in sorted({p for p, _ in picks}):
        starts = np.array([s for p, s in picks if p == i])
        batches.append(window_batch(parts[i][0], starts, L, dmap))
    batch = {k: torch.cat([b[k] for b in batches]) for k in ("h", "next", "label")}
    loss, last = head_loss(head, batch, depth)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    opt.step()
    return float(loss), last


def eval_windows(data: SplitData, W: int, rows: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Windows covering every run of `data` (or of `rows`, contiguous stretches) in pieces of at most W + 1
    rows: {window length L: start rows}. Each window's first row only feeds the next ones."""
    n = len(data)
    keep = np.ones(n, dtype=bool) if rows is None else np.isin(np.arange(n), rows)
    first = (data.run_start == np.arange(n)) | ~np.r_[False, keep[:-1]]   # a new run, or after a dropped row
    seg = np.cumsum(first)                                                 # stretch id of every row
    starts = np.flatnonzero(keep & first)
    ends = starts + np.array([np.count_nonzero(keep & (seg == seg[a])) for a in starts], dtype=np.int64)
    out: dict[int, list] = {}
    for a, b in zip(starts, ends):
        for s in range(a, b - 1, W):
            L = min(W, b - 1 - s)
            out.setdefault(L, []).append(s)
    return {L: np.array(v, dtype=np.int64) for L, v in out.items()}


@torch.inference_mode()
def run_levels(head: FeatureHead, data: SplitData, depth: int, window: int = 256, batch: int = 8,
               rows: np.ndarray | None = None, desc: str | None = None, other: np.ndarray | None = None) -> dict:
    """The head over `data` (teacher-forced true features, as in training): per level d = since_big, the record
    rows t where it predicts the big model's greedy token (pair (t, s=d)), its draft token and the statistics
    of its draft-vocabulary distribution. Returns numpy arrays t, s, token, p1, p2 (top-2 probabilities),
    entropy (normalised by log K), all [P]; with `other` (a token per record row, -1 for none: the copy rule's
    candidate), p_other: the head's probability of that token (0 outside the draft vocabulary)."""
    dmap = torch.zeros(head.vocab_size, dtype=torch.long)
    index = draft_index(head)
    jobs = [(L, st[i:i + batch]) for L, st in eval_windows(data, window, rows).items()
            for i in range(0, len(st), batch)]
    keys = ("t", "s", "token", "p1", "p2", "entropy", "p_other")
    out = {k: [] for k in keys}
    for L, starts in (tqdm(jobs, desc=desc, leave=False, mininterval=2) if desc else jobs):
        b = window_batch(data, starts, L, dmap)
        for d, pred in enumerate(head(b["h"], b["next"], depth), 1):
            if d > L:
                break
            p = torch.softmax(head.logits(pred[:, d - 1:]).flatten(0, 1), -1)
            top = p.topk(2, -1)
            out["t"].append(b["rows"][:, d - 1:].ravel())
            out["s"].append(np.full(len(p), d))
            out["token"].append(head.draft_ids[top.indices[:, 0]].numpy())
            out["p1"].append(top.values[:, 0].numpy())
            out["p2"].append(top.values[:, 1].numpy())
            out["entropy"].append((-(p * p.clamp_min(1e-12).log()).sum(-1) / np.log(p.shape[-1])).numpy())
            if other is not None:
                out["p_other"].append(probs_of(p, index, other[out["t"][-1]]))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def probs_of(p: torch.Tensor, index: torch.Tensor, tokens: np.ndarray) -> np.ndarray:
    """p [P, K]: the probability of tokens [P] (-1 or outside the draft vocabulary: 0)."""
    tok = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    i = torch.where(tok >= 0, index[tok.clamp_min(0)], torch.full_like(tok, -1))
    return torch.where(i >= 0, p.gather(1, i.clamp_min(0)[:, None])[:, 0], torch.zeros(())).numpy()


__all__ = ["train_feature_head", "run_levels", "eval_windows", "window_starts", "window_batch", "head_loss"]
