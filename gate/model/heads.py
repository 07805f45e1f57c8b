"""Predictors trained from records: the word-completion head (a small head that completes the current word or
predicts punctuation from the last few tokens) and Medusa-style future-token heads.

    WordHead(ctx, hn, s)       last N tokens, standardised stale hidden h[t-s], s -> logits over R + 1 for argmax[t]
    FutureHeads(hn, s)         standardised hidden h[p], s in 1..K -> logits over R + 1 for argmax[p+s]
    NgramTable, ContextIndex   training-text n-gram and in-context copy continuations (gate features)
    pair_index, context_ids    the (t, s) training pairs and their token windows

At record position t the big model has read tokens[..t]; argmax[t] is its greedy choice for token t+1; s =
since_big >= 1. R: corpus_tools.inventory.restricted_vocab; class |R| = "other" (the big model's choice is outside
R). Cost per proposed token: `flops_per_token()`. The training loops are in gate/train/distill.py.
Positions, targets, architectures and why: docs/drafters.md#the-predictors-gatemodelheadspy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------ modules
class HiddenNorm(nn.Module):
    """Per-dimension standardisation of the big model's hidden state with train-split statistics."""

    def __init__(self, hidden_size: int, mean=None, std=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size) if mean is None else torch.as_tensor(mean).float())
        self.register_buffer("std", torch.ones(hidden_size) if std is None else torch.as_tensor(std).float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() - self.mean) / self.std

    @staticmethod
    def stats(hidden: np.ndarray, n: int = 50000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        idx = np.random.default_rng(seed).choice(len(hidden), size=min(n, len(hidden)), replace=False)
        x = np.asarray(hidden[np.sort(idx)], dtype=np.float64)
        return x.mean(0).astype(np.float32), (x.std(0) + 1e-3).astype(np.float32)


class ResBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class WordHead(nn.Module):
    """Last N tokens (+ stale big hidden state, + since_big) -> distribution over R + 1. See docs/drafters.md."""

    def __init__(self, vocab_size: int, hidden_size: int, n_out: int, *, n_ctx: int = 8, d_tok: int = 64,
                 d_hid: int = 128, width: int = 512, max_s: int = 3, use_hidden: bool = True,
                 embed: torch.Tensor | None = None):
        super().__init__()
        self.vocab_size, self.hidden_size, self.n_out = vocab_size, hidden_size, n_out
        self.n_ctx, self.d_tok, self.d_hid, self.width = n_ctx, d_tok, d_hid, width
        self.max_s, self.use_hidden = max_s, use_hidden
        self.pad = vocab_size                       # context slots before the start of the text
        if embed is not None:                       # training form: frozen big embedding + trained projection
            self.register_buffer("embed", embed, persistent=False)   # kept in its dtype (bf16: half the memory)
            self.tok_proj = nn.Linear(embed.shape[1], d_tok)
            self.pad_vec = nn.Parameter(torch.zeros(d_tok))
            self.table = None
        else:                                       # inference form: baked lookup table [V+1, d_tok]
            self.embed = None
            self.table = nn.Parameter(torch.zeros(vocab_size + 1, d_tok), requires_grad=False)
        self.s_emb = nn.Embedding(max_s + 1, 16)
        d_in = n_ctx * d_tok + 16 + (d_hid if use_hidden else 0)
        self.hid_proj = nn.Linear(hidden_size, d_hid) if use_hidden else None
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.to_h = nn.Linear(width, hidden_size)      # predicted (standardised) big hidden state at t
        self.out = nn.Linear(hidden_size, n_out)       # big output rows of R (see init_output)

    def init_output(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        with torch.no_grad():
            self.out.weight.copy_(weight)
            self.out.bias.copy_(bias)

    def config(self) -> dict:
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, n_out=self.n_out,
                    n_ctx=self.n_ctx, d_tok=self.d_tok, d_hid=self.d_hid, width=self.width,
                    max_s=self.max_s, use_hidden=self.use_hidden)

    def token_vectors(self, ctx: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[ctx]
        is_pad = ctx >= self.vocab_size
        v = self.tok_proj(self.embed[ctx.clamp(max=self.vocab_size - 1)].float())
        return torch.where(is_pad[..., None], self.pad_vec.expand_as(v), v)

    @torch.no_grad()
    def bake(self) -> None:
        """Replace (frozen embedding, projection) by the equivalent lookup table; drops the embedding."""
        if self.table is not None:
            return
        rows = [self.tok_proj(self.embed[i:i + 16384].float()) for i in range(0, len(self.embed), 16384)]
        tab = torch.cat(rows + [self.pad_vec[None]], 0)
        self.table = nn.Parameter(tab.contiguous(), requires_grad=False)
        del self.tok_proj, self.pad_vec
        self.embed = None

    def forward(self, ctx: torch.Tensor, hn: torch.Tensor | None, s: torch.Tensor, return_hidden: bool = False):
        """ctx [B, N] token ids (pad = vocab_size), hn [B, D] standardised stale hidden, s [B] -> logits [B, n_out]
        (and the predicted standardised hidden state at t [B, D] with return_hidden)."""
        parts = [self.token_vectors(ctx).flatten(1), self.s_emb(s.clamp(0, self.max_s))]
        if self.use_hidden:
            parts.append(self.hid_proj(hn))
        x = F.silu(self.fc1(torch.cat(parts, -1)))
        x = x + F.silu(self.fc2(x))
        h = self.to_h(self.norm(x))
        logits = self.out(h)
        return (logits, h) if return_hidden else logits

    def n_params(self) -> int:
        """Trained parameters used at inference (the lookup table counted as d_tok x (V+1))."""
        n = sum(p.numel() for name, p in self.named_parameters() if name not in ("table",)
                and not name.startswith(("tok_proj", "pad_vec")))
        return n + (self.vocab_size + 1) * self.d_tok

    def flops_per_token(self) -> int:
        macs = (self.fc1.in_features * self.width + self.width * self.width + self.width * self.hidden_size
                + self.hidden_size * self.n_out)
        if self.use_hidden:
            macs += self.hidden_size * self.d_hid
        return 2 * macs


class FutureHeads(nn.Module):
    """K Medusa residual blocks on the standardised hidden state + one shared output layer over R + 1."""

    def __init__(self, hidden_size: int, n_out: int, k: int, out_weight: torch.Tensor | None = None,
                 out_bias: torch.Tensor | None = None):
        super().__init__()
        self.hidden_size, self.n_out, self.k = hidden_size, n_out, k
        self.blocks = nn.ModuleList([ResBlock(hidden_size) for _ in range(k)])
        self.out = nn.Linear(hidden_size, n_out)
        with torch.no_grad():
            if out_weight is not None:
                self.out.weight.copy_(out_weight)
            if out_bias is not None:
                self.out.bias.copy_(out_bias)

    def config(self) -> dict:
        return dict(hidden_size=self.hidden_size, n_out=self.n_out, k=self.k)

    def forward(self, hn: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """hn [B, D] standardised hidden at p, s [B] in 1..k -> logits [B, n_out] for argmax[p+s]."""
        s = s.clamp(1, self.k)
        x = torch.empty_like(hn)
        for j in torch.unique(s).tolist():
            m = s == j
            x[m] = self.blocks[j - 1](hn[m])
        return self.out(x)

    def forward_all(self, hn: torch.Tensor, return_hidden: bool = False):
        """[B, D] -> [B, k, n_out]: every head's logits (and [B, k, D] predicted hidden states)."""
        h = torch.stack([b(hn) for b in self.blocks], 1)
        return (self.out(h), h) if return_hidden else self.out(h)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """One head (one proposal): its residual block and the shared output layer."""
        return 2 * (self.hidden_size * self.hidden_size + self.hidden_size * self.n_out)


# ------------------------------------------------------------------------------------------------ indexing
def run_starts(book: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Row index where the contiguous stretch of each row starts (a new book or a gap in pos starts one)."""
    book, pos = np.asarray(book), np.asarray(pos)
    n = len(book)
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = (book[1:] != book[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = np.flatnonzero(new)
    return starts[np.searchsorted(starts, np.arange(n), side="right") - 1].astype(np.int64)


def pair_index(run_start: np.ndarray, rows: np.ndarray, max_s: int) -> tuple[np.ndarray, np.ndarray]:
    """All valid (t, s) for t in rows, s in 1..max_s with the stale position t - s in the same run; sorted by
    t, then s."""
    ts, ss = [], []
    rows = np.asarray(rows, dtype=np.int64)
    for s in range(1, max_s + 1):
        ok = rows - s >= run_start[rows]
        ts.append(rows[ok])
        ss.append(np.full(int(ok.sum()), s, dtype=np.int64))
    t, s = np.concatenate(ts), np.concatenate(ss)
    order = np.lexsort((s, t))
    return t[order], s[order]


def context_ids(tokens: np.ndarray, run_start: np.ndarray, t: np.ndarray, n_ctx: int, pad: int) -> np.ndarray:
    """[B, n_ctx] of tokens[t-n_ctx+1..t], with `pad` before the start of each run."""
    idx = t[:, None] - np.arange(n_ctx - 1, -1, -1)[None, :]
    ok = idx >= run_start[t][:, None]
    return np.where(ok, tokens[np.clip(idx, 0, None)], pad)


# ------------------------------------------------------------------------------------------------ n-grams
class NgramTable:
    """Token n-gram statistics of the training books' text (orders 1..max_order): for a context of the last
    n tokens, the most frequent next token, its count and the context's total count.

    The word-completion idea at its simplest: "Benn" is followed by "et" in every book. It is built
    from the full text of the train-split books (not only the recorded positions, so it sees far more text than
    the heads), minus the positions the gate is trained on (so the gate sees the table's confidence as it is on
    unseen text). Stored as sorted int64 context keys per order (key = ids in base V); lookup is a binary search.
    Gate features only: the candidate stays the heads'.
    """

    def __init__(self, vocab_size: int, keys: list, top: list, top_count: list, total: list):
        self.V = vocab_size
        self.keys, self.top, self.top_count, self.total = keys, top, top_count, total
        self.max_order = len(keys)

    @classmethod
    def build(cls, seqs: list[np.ndarray], vocab_size: int, max_order: int = 3, min_total: int = 2,
              masks: list[np.ndarray] | None = None) -> "NgramTable":
        """seqs: token id arrays; masks (same shapes, optional): True where position i+1 must not be counted
        as the continuation of its context."""
        if vocab_size ** (max_order + 1) >= 2 ** 63:
            raise ValueError(f"vocabulary {vocab_size} too large for order {max_order} keys")
        V = vocab_size
        keys, top, top_count, total = [], [], [], []
        for n in range(1, max_order + 1):
            ctx_keys, nxt = [], []
            for j, x in enumerate(seqs):
                x = np.asarray(x, dtype=np.int64)
                if len(x) <= n:
                    continue
                k = np.zeros(len(x) - n, dtype=np.int64)
                for o in range(n):                      # context x[i-n+1..i] for i = n-1 .. len-2
                    k = k * V + x[o:len(x) - n + o]
                ok = np.ones(len(k), dtype=bool)
                if masks is not None:
                    ok = ~np.asarray(masks[j], dtype=bool)[n:]
                ctx_keys.append(k[ok])
                nxt.append(x[n:][ok])
            if not ctx_keys:
                keys.append(np.zeros(0, np.int64)); top.append(np.zeros(0, np.int32))
                top_count.append(np.zeros(0, np.int32)); total.append(np.zeros(0, np.int32))
                continue
            k, y = np.concatenate(ctx_keys), np.concatenate(nxt)
            pair, pc = np.unique(k * V + y, return_counts=True)    # sorted by (context, next)
            pk, py = pair // V, pair % V
            uk, start = np.unique(pk, return_index=True)
            tot = np.add.reduceat(pc, start)
            # most frequent next per context (ties: smallest id)
            order = np.lexsort((py, -pc, pk))
            first = np.r_[True, pk[order][1:] != pk[order][:-1]]
            best = order[first]
            keep = tot >= min_total
            keys.append(uk[keep]); top.append(py[best][keep].astype(np.int32))
            top_count.append(pc[best][keep].astype(np.int32)); total.append(tot[keep].astype(np.int32))
        return cls(V, keys, top, top_count, total)

    def lookup(self, ctx: np.ndarray, pad: int) -> dict[str, np.ndarray]:
        """ctx [B, N] (pad before the text start). Per order n: top token (-1 if unseen), p_top, total."""
        ctx = np.asarray(ctx, dtype=np.int64)
        B = len(ctx)
        out = {}
        for n in range(1, self.max_order + 1):
            c = ctx[:, -n:]
            valid = (c != pad).all(1) & (c >= 0).all(1) & (c < self.V).all(1)
            k = np.zeros(B, dtype=np.int64)
            for o in range(n):
                k = k * self.V + np.where(valid, c[:, o], 0)
            i = np.searchsorted(self.keys[n - 1], k)
            i = np.clip(i, 0, max(len(self.keys[n - 1]) - 1, 0))
            hit = valid & (len(self.keys[n - 1]) > 0)
            if len(self.keys[n - 1]):
                hit &= self.keys[n - 1][i] == k
            tot = np.where(hit, self.total[n - 1][i] if len(self.keys[n - 1]) else 0, 0)
            out[f"top{n}"] = np.where(hit, self.top[n - 1][i] if len(self.keys[n - 1]) else -1, -1)
            out[f"p{n}"] = np.where(hit, (self.top_count[n - 1][i] if len(self.keys[n - 1]) else 0)
                                    / np.maximum(tot, 1), 0.0)
            out[f"n{n}"] = tot
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {}
        for n in range(self.max_order):
            t[f"keys{n + 1}"] = torch.from_numpy(self.keys[n].copy())
            t[f"top{n + 1}"] = torch.from_numpy(self.top[n].copy())
            t[f"topc{n + 1}"] = torch.from_numpy(self.top_count[n].copy())
            t[f"total{n + 1}"] = torch.from_numpy(self.total[n].copy())
        return t

    @classmethod
    def from_tensors(cls, t: dict, vocab_size: int) -> "NgramTable":
        n = len([k for k in t if k.startswith("keys")])
        return cls(vocab_size, [t[f"keys{i}"].numpy() for i in range(1, n + 1)],
                   [t[f"top{i}"].numpy() for i in range(1, n + 1)], [t[f"topc{i}"].numpy() for i in range(1, n + 1)],
                   [t[f"total{i}"].numpy() for i in range(1, n + 1)])

    def n_entries(self) -> int:
        return int(sum(len(k) for k in self.keys))


class ContextIndex:
    """In-context copying ("prompt lookup"): continuation counts of the n-grams (n = 1..max_order) of the text
    so far. Names are the typical case: once "Elinor" has been written, "El" is followed by "inor", a token the
    restricted heads may not even have. At position t the statistics cover the pairs (n tokens ending at i,
    token i+1) with i + 1 <= t; the query key is the last n tokens. The most frequent continuation wins, ties
    going to the one that reached the count first, in train (records) and decode alike.
    """

    def __init__(self, max_order: int = 3):
        self.max_order = max_order
        self.reset()

    def reset(self):
        self.ids: list[int] = []
        self.tables = [dict() for _ in range(self.max_order)]   # key -> [counts dict, top, top_count, total]
        self.undo: list[list[tuple]] = []                        # per token: what extend changed, to pop it

    def extend(self, new_ids) -> None:
        ids = self.ids
        for y in new_ids:
            y = int(y)
            i = len(ids)                       # y is token i; add pairs (ids[i-n..i-1] -> y)
            changes = []
            for n in range(1, self.max_order + 1):
                if i - n < 0:
                    break
                key = tuple(ids[i - n:i])
                e = self.tables[n - 1].get(key)
                if e is None:
                    self.tables[n - 1][key] = [{y: 1}, y, 1, 1]
                    changes.append((n, key, None, 0))
                    continue
                changes.append((n, key, e[1], e[2]))
                c = e[0][y] = e[0].get(y, 0) + 1
                e[3] += 1
                if c > e[2]:
                    e[1], e[2] = y, c
            ids.append(y)
            self.undo.append(changes)

    def pop(self) -> None:
        """Undo the last token's extend exactly (counts, and the top continuation with its tie order)."""
        y = self.ids.pop()
        for n, key, top, top_count in self.undo.pop():
            table = self.tables[n - 1]
            if top is None:
                del table[key]
                continue
            e = table[key]
            e[0][y] -= 1
            if not e[0][y]:
                del e[0][y]
            e[1], e[2], e[3] = top, top_count, e[3] - 1

    def query(self) -> tuple[list[int], list[float], list[int]]:
        """(top, p_top, total) per order 1..max_order for the current last tokens (-1, 0, 0 when unseen)."""
        tops, ps, tots = [], [], []
        for n in range(1, self.max_order + 1):
            e = self.tables[n - 1].get(tuple(self.ids[-n:])) if len(self.ids) >= n else None
            if e is None:
                tops.append(-1), ps.append(0.0), tots.append(0)
            else:
                tops.append(e[1]), ps.append(e[2] / e[3]), tots.append(e[3])
        return tops, ps, tots

    def sync(self, ids) -> None:
        """Make the index cover exactly `ids`: pop what the text no longer holds (a rollback), extend the rest."""
        k = len(self.ids)
        if len(ids) < k or list(ids[:k]) != self.ids:
            common = next((i for i, (a, b) in enumerate(zip(self.ids, ids)) if a != b), min(k, len(ids)))
            for _ in range(k - common):
                self.pop()
            k = common
        self.extend(ids[k:])


def context_copy_stats(tokens: np.ndarray, run_start: np.ndarray, max_order: int = 3) -> dict[str, np.ndarray]:
    """ContextIndex statistics at every record position (each contiguous run is its own text)."""
    N = len(tokens)
    out = {f"{k}{n}": np.zeros(N, dtype=np.int64 if k != "p" else np.float32)
           for k in ("top", "p", "n") for n in range(1, max_order + 1)}
    idx = ContextIndex(max_order)
    for t in range(N):
        if run_start[t] == t:
            idx.reset()
        idx.extend([tokens[t]])
        tops, ps, tots = idx.query()
        for n in range(max_order):
            out[f"top{n + 1}"][t], out[f"p{n + 1}"][t], out[f"n{n + 1}"][t] = tops[n], ps[n], tots[n]
    return out
