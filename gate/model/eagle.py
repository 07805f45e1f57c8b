"""The feature head (EAGLE-style): one decoder layer predicts the big model's next hidden state from its last
one and the next token's embedding, then the token through the big model's output rows.

    logits = ChainCache(head).draft(ids, hiddens)                    # draft-vocabulary logits for len(ids)
    tok, score = drafter.propose(ids, hiddens, since_big)            # EagleDrafter: every computed hidden row

FeatureHead.forward trains every chain depth at once (`level_mask`); ChainCache keeps one KV entry per text
position, "true" over the big model's rows and "chain" over its own predictions. The gate scores the head's token
and the copy rule's (candidate_features); its pick and the copy rule's meet as estimated precisions (drafter.json's
precision_maps, gate/model/precision.py). Format skipgate-eagle/1 (`EAGLE`, eagle.safetensors). docs/drafters.md.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from corpus_tools.inventory import CLASSES, token_class_from_tables
from gate.model.artifact import ArtifactError, Format, write_artifact
from gate.model.base import Drafter
from gate.model.copyrule import COPY_SPAN, MAX_N, CopyIndex
from gate.model.features import GATES
from gate.model.precision import SourceMaps, combine_sources, maps_from_meta, maps_meta


def rotary(pos: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(pos), dim] of rotary position embeddings (the half-split layout LLaMA uses)."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = pos.float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, hd] rotated by position (cos/sin [T, hd])."""
    a, b = x.chunk(2, -1)
    return x * cos[:, None, :] + torch.cat([-b, a], -1) * sin[:, None, :]


def level_mask(L: int, d: int) -> torch.Tensor:
    """Bool [L, d*L]: which keys (levels 1..d, L positions each) the level-d query at position i may read:
    level 1 at j <= i-d+1 (the true entries up to the chain's anchor), level m >= 2 at j == i-d+m (the
    chain's own entries). Queries with i < d-1 have no anchor; they read their own key only (masked in the loss)."""
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    blocks = [j <= i - d + 1] + [j == i - d + m for m in range(2, d + 1)]
    mask = torch.cat(blocks, 1)
    own = torch.zeros(L, d * L, dtype=torch.bool)
    own[torch.arange(L), (d - 1) * L + torch.arange(L)] = True
    return torch.where(mask.any(1, keepdim=True), mask, own)


class FeatureHead(nn.Module):
    """One decoder layer over (feature, next-token embedding) entries; see the module docstring."""

    def __init__(self, vocab_size: int, hidden_size: int, n_draft: int, n_heads: int | None = None,
                 mlp: int | None = None):
        super().__init__()
        D = hidden_size
        self.vocab_size, self.hidden_size, self.n_draft = vocab_size, D, n_draft
        self.n_heads = n_heads or max(1, D // 64)
        self.mlp = mlp or 2 * D
        if D % self.n_heads or (D // self.n_heads) % 2:
            raise ValueError(f"hidden size {D} does not split into {self.n_heads} heads of even width")
        self.register_buffer("embed", torch.zeros(vocab_size, D))         # big model's input embedding
        self.register_buffer("out_rows", torch.zeros(n_draft, D))         # its output rows of the draft vocab
        self.register_buffer("draft_ids", torch.zeros(n_draft, dtype=torch.long))
        self.register_buffer("h_mean", torch.zeros(D))
        self.register_buffer("h_std", torch.ones(D))
        self.norm_h, self.norm_e = nn.RMSNorm(D, eps=1e-6), nn.RMSNorm(D, eps=1e-6)
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.norm_attn, self.norm_mlp, self.norm_out = (nn.RMSNorm(D, eps=1e-6) for _ in range(3))
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.up = nn.Linear(D, 2 * self.mlp, bias=False)
        self.down = nn.Linear(self.mlp, D, bias=False)
        self.out = nn.Linear(D, D)

    def config(self) -> dict:
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "n_draft": self.n_draft,
                "n_heads": self.n_heads, "mlp": self.mlp}

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self) -> int:
        """2 x multiply-accumulates of one draft step (attention over the context not counted: it is
        context-length x width, small next to the matrices at these lengths)."""
        D = self.hidden_size
        return 2 * (2 * D * D + 3 * D * D + D * D + 3 * D * self.mlp + D * D + self.n_draft * D)

    # -- pieces ---------------------------------------------------------------------------------------------
    def standardise(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() - self.h_mean) / self.h_std

    def entry(self, feat: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Entry vectors from standardised features [.., D] and the next tokens [..]."""
        return self.fc(torch.cat([self.norm_h(feat), self.norm_e(self.embed[tokens])], -1))

    def project(self, u: torch.Tensor, pos: torch.Tensor):
        """q, k, v [.., T, H, hd] of entries u [.., T, D] at positions pos [T]."""
        *lead, T, D = u.shape
        q, k, v = self.qkv(self.norm_attn(u)).view(*lead, T, 3, self.n_heads, D // self.n_heads).unbind(-3)
        cos, sin = rotary(pos, D // self.n_heads)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(self, u: torch.Tensor, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """The standardised prediction of each entry: attention (q over k, v with a bool mask), MLP, output."""
        att = F.scaled_dot_product_attention(q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3),
                                             attn_mask=mask)
        x = u + self.o(att.transpose(-2, -3).flatten(-2))
        gate, up = self.up(self.norm_mlp(x)).chunk(2, -1)
        x = x + self.down(F.silu(gate) * up)
        return self.out(self.norm_out(x))

    def logits(self, pred: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary from standardised predictions."""
        return (pred * self.h_std + self.h_mean) @ self.out_rows.T

    # -- training: every level at once --------------------------------------------------------------------
    def forward(self, h: torch.Tensor, next_tokens: torch.Tensor, depth: int = 1) -> list[torch.Tensor]:
        """Standardised predictions per level: h [B, L, D] raw hidden states at positions 0..L-1,
        next_tokens [B, L] the token at each position + 1. Level d's row i predicts the hidden state at i+1
        from a chain anchored at i-d+1 (rows i < d-1 have no anchor)."""
        B, L, _ = h.shape
        pos = torch.arange(L)
        u = self.entry(self.standardise(h), next_tokens)
        q, k, v = self.project(u, pos)
        keys, vals, preds = [k], [v], []
        for d in range(1, depth + 1):
            if d > 1:
                prev = F.pad(preds[-1][:, :-1], (0, 0, 1, 0))          # level d-1's prediction at i-1
                u = self.entry(prev, next_tokens)
                q, k, v = self.project(u, pos)
                keys.append(k)
                vals.append(v)
            preds.append(self.finish(u, q, torch.cat(keys, 1), torch.cat(vals, 1), level_mask(L, d)))
        return preds


class ChainCache:
    """The feature head's KV cache over one text at decode time (see the module docstring, "Entries").

    `draft(ids, hiddens)` returns the draft-vocabulary logits for position len(ids): it keeps the entries whose
    inputs are unchanged, adds true entries for positions the big model computed since (hiddens: its hidden
    states at positions 0 .. big_cached-1, big_cached = len(hiddens)), then chain entries up to len(ids)-2.
    """

    def __init__(self, head: FeatureHead):
        self.head = head
        self.reset()

    def reset(self) -> None:
        D, H = self.head.hidden_size, self.head.n_heads
        self.k = torch.zeros(0, H, D // H)
        self.v = torch.zeros(0, H, D // H)
        self.preds = torch.zeros(0, D)
        self.tokens: list[int] = []      # ids[0 .. n_entries]: the text the entries were computed from
        self.n_true = 0
        self.steps = 0                   # entries computed (the ledger's draft steps)

    @property
    def n_entries(self) -> int:
        return len(self.preds)

    def crop(self, n: int) -> None:
        n = max(0, min(n, self.n_entries))
        self.k, self.v, self.preds = self.k[:n], self.v[:n], self.preds[:n]
        self.tokens = self.tokens[:n + 1] if n else []
        self.n_true = min(self.n_true, n)

    def sync(self, ids: Sequence[int], big_cached: int) -> None:
        """Keep the entries still valid for `ids` (true ones only if the big model has new rows)."""
        same = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            same += 1
        keep = min(same - 1, self.n_entries)
        if big_cached != self.n_true:    # new true rows make the chain stale; fewer (a crop) make entries chain
            keep = min(keep, self.n_true, big_cached)
        self.crop(max(keep, 0))

    @torch.inference_mode()
    def draft(self, ids: Sequence[int], hiddens: torch.Tensor) -> torch.Tensor:
        big_cached = len(hiddens)
        if not 1 <= big_cached < len(ids):
            raise ValueError(f"the feature head needs 1 <= big_cached ({big_cached}) < len(ids) ({len(ids)})")
        self.sync(ids, big_cached)
        n = self.n_entries
        if n < big_cached:                            # true entries, one batched pass
            feats = self.head.standardise(torch.as_tensor(hiddens[n:big_cached]))
            self._add(feats, torch.as_tensor(list(ids[n + 1:big_cached + 1])), n)
            self.n_true = big_cached
        while self.n_entries < len(ids) - 1:          # chain entries, one step each
            j = self.n_entries
            self._add(self.preds[j - 1:j], torch.as_tensor([ids[j + 1]]), j)
        self.tokens = list(ids)
        return self.head.logits(self.preds[-1])

    def _add(self, feats: torch.Tensor, tokens: torch.Tensor, start: int) -> None:
        """Entries for positions start .. start+T-1, attending to the cache and causally to each other."""
        T = len(tokens)
        pos = torch.arange(start, start + T)
        u = self.head.entry(feats, tokens)
        q, k, v = self.head.project(u[None], pos)
        keys, vals = torch.cat([self.k, k[0]]), torch.cat([self.v, v[0]])
        mask = torch.ones(T, start + T, dtype=torch.bool).tril(start)
        pred = self.head.finish(u[None], q, keys[None], vals[None], mask)[0]
        self.k, self.v, self.preds = keys, vals, torch.cat([self.preds, pred])
        self.steps += T


# ------------------------------------------------------------------------------------------------ the gate
# Each proposal has up to two candidates: the head's top token and the copy rule's (prompt lookup) token. The
# gate scores both from these features (one function, used by the fit and by EagleDrafter.propose) and the
# drafter proposes the better-scoring one.
def gate_feature_names(max_depth: int) -> list[str]:
    return (["log_p_cand", "p_cand", "is_head1", "p1", "margin", "entropy", "copy_agree", "log_copy_len",
             "copy_len_ge4"] + [f"depth_{d}" for d in range(1, max_depth + 1)] + [f"cand_{c}" for c in CLASSES])


def gate_features(p_cand, is_head1, p1, p2, entropy, copy_agree, copy_len, depth, cls, max_depth: int) -> np.ndarray:
    """[N, F] gate features of N candidates (arrays [N]); see gate_feature_names."""
    p_cand = np.asarray(p_cand, np.float32)
    f = lambda a: np.broadcast_to(np.asarray(a, np.float32), p_cand.shape)
    copy_len = f(copy_len)
    cols = [np.log(p_cand + 1e-6), p_cand, f(is_head1), f(p1), f(p1) - f(p2), f(entropy), f(copy_agree),
            np.log1p(copy_len), (copy_len >= COPY_SPAN).astype(np.float32)]
    depth = np.clip(np.asarray(depth), 1, max_depth)
    onehot_d = np.eye(max_depth, dtype=np.float32)[depth - 1]
    onehot_c = np.eye(len(CLASSES), dtype=np.float32)[np.asarray(cls, np.int64)]
    return np.concatenate([np.stack(cols, 1), onehot_d, onehot_c], 1)


def candidate_features(head_tok, p1, p2, entropy, p_copy, copy_tok, copy_len, depth, last_tok, tables,
                       max_depth: int) -> dict:
    """Both candidates of N proposals: tokens [N, 2] (-1: none), valid [N, 2], X [N, 2, F]."""
    head_tok, copy_tok = np.asarray(head_tok, np.int64), np.asarray(copy_tok, np.int64)
    agree = (copy_tok == head_tok) & (copy_tok >= 0)
    cands = np.stack([head_tok, np.where((copy_tok >= 0) & ~agree, copy_tok, -1)], 1)
    valid = cands >= 0
    cls = token_class_from_tables(np.repeat(np.asarray(last_tok)[:, None], 2, 1), np.maximum(cands, 0),
                                  tables["cls"], tables["ends_alnum"])
    X = [gate_features(pc, ih, p1, p2, entropy, ca, copy_len, depth, cls[:, k], max_depth)
         for k, (pc, ih, ca) in enumerate([(p1, 1, agree), (p_copy, 0, np.ones_like(agree))])]
    return {"cands": cands, "valid": valid, "X": np.stack(X, 1), "cls": cls}


class EagleDrafter(Drafter):
    """The Drafter contract (gate/model/base.py) around the feature head, its KV cache, the copy rule and
    a gate over both candidates; like the heads drafter, the gate's pick and the copy rule's candidate are
    compared as estimated precisions (gate.model.precision: `maps`, one SourceMaps; an artifact from before them
    keeps its per-length trust table, `copy_trust` in drafter.json, and proposes as it did). It reads every
    hidden row the big model computed (reads_all_hidden), so the decode loop keeps them and the cache turns them
    into true entries. When it proposes its head's token it leaves the head's distribution in `last_logits` (over
    the whole vocabulary, -inf outside the draft vocabulary): sampled decoding then drafts a sample of it, and
    speculative sampling accepts with min(1, q/p) (EAGLE's sampling)."""
    reads_all_hidden = True
    GATE = "gate"       # the name of its one gate (drafter.json's calibration and precision_maps)

    def __init__(self, head: FeatureHead, gate, threshold: float, max_skip: int, hidden_layer: int,
                 tables: dict, copy_trust: np.ndarray | None, depth: int, meta: dict | None = None,
                 maps: SourceMaps | None = None):
        self.head, self.gate = head.eval(), gate
        self.maps = maps
        self.table = None if maps is not None or copy_trust is None else np.asarray(copy_trust, dtype=np.float32)
        self.threshold, self.max_skip, self.hidden_layer = float(threshold), int(max_skip), int(hidden_layer)
        self.depth = int(depth)     # chain steps the head and its gate were trained for; beyond: copies only
        self.tables, self.meta = tables, meta or {}
        self.cache = ChainCache(self.head)
        if maps is not None:
            self.copies, self.extend = CopyIndex(maps.max_n or MAX_N), maps.extend
        else:
            self.copies, self.extend = CopyIndex(MAX_N if self.table is None else len(self.table) - 1), 0
        self.index = draft_index(head)

    @property
    def scoring(self):
        """What gate.model.precision.combine_sources takes: the SourceMaps, an older artifact's table, or None."""
        return self.maps if self.maps is not None else self.table

    def start(self) -> None:
        self.cache.reset()
        self.copies.reset()
        self.last_logits: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return self.cache.steps

    @torch.inference_mode()
    def propose(self, ids: Sequence[int], hiddens: torch.Tensor, since_big: int) -> tuple[int, float]:
        if since_big < 1 or hiddens is None or len(hiddens) != len(ids) - since_big:
            raise ValueError("the feature head needs every hidden row the big model computed (len(ids) - since_big)")
        logits = self.cache.draft(ids, hiddens)
        p = torch.softmax(logits, -1)
        (p1, p2), (i1, _) = p.topk(2)
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum()) / math.log(len(p))
        self.copies.sync(ids)
        copy_tok, copy_len = self.copies.query(self.extend)   # the gate reads the length up to max_n, the map all
        i = int(self.index[copy_tok]) if copy_tok >= 0 else -1
        p_copy = float(p[i]) if i >= 0 else 0.0
        f = candidate_features([int(self.head.draft_ids[i1])], [float(p1)], [float(p2)], [entropy], [p_copy],
                               [copy_tok], [min(copy_len, self.copies.max_n)], [min(since_big, self.depth)],
                               [ids[-1]], self.tables, self.depth)
        scores = self.gate.score(f["X"][0]).numpy()
        scores[~f["valid"][0]] = -1.0
        if since_big > self.depth:      # untrained chain depth: only the copy rule can skip here
            scores[:] = -1.0 if self.maps is not None else np.minimum(scores, 0.0)   # (-1: no gate candidate)
        k = int(scores.argmax())
        tok, score, used = combine_sources(f["cands"][0, k:k + 1], scores[k:k + 1], np.array([copy_tok]),
                                           np.array([copy_len]), self.scoring)
        self.last_logits = None                       # the head's own distribution, when its token is proposed
        if k == 0 and not used[0]:
            self.last_logits = torch.full((self.head.vocab_size,), -math.inf)
            self.last_logits[self.head.draft_ids] = logits
        return int(tok[0]), float(score[0]) if since_big < self.max_skip else 0.0

    # -- persistence (the folder of gate/model/artifact.py) ---------------------------------------------------
    def save(self, path) -> Path:
        t = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        t["head.embed"] = t["head.embed"].half()        # frozen copy of the big model's input embedding
        t.update({f"gate.{k}": v for k, v in self.gate.state().items()})
        t.update({f"tables.{k}": torch.from_numpy(np.asarray(v).copy()) for k, v in self.tables.items()})
        meta = dict(self.meta)
        meta.update(format=EAGLE_FORMAT, hidden_layer=self.hidden_layer, max_skip=self.max_skip,
                    threshold=self.threshold, head=self.head.config(), gate={"kind": self.gate.kind},
                    features=gate_feature_names(self.depth), depth=self.depth,
                    copy_trust=None if self.table is None else [float(x) for x in self.table])
        if self.maps is not None:
            meta["precision_maps"] = maps_meta({self.GATE: self.maps}, self.meta.get("precision_maps"))
        self.meta = write_artifact(path, EAGLE_TENSORS, t, meta)
        return Path(path)

    @classmethod
    def from_tensors(cls, t: dict, meta: dict, path="") -> "EagleDrafter":
        head = FeatureHead(**meta["head"])
        st = {k[5:]: v.float() if k == "head.embed" else v for k, v in t.items() if k.startswith("head.")}
        head.load_state_dict(st)
        gate = GATES[meta["gate"]["kind"]].from_state({k[5:]: v for k, v in t.items() if k.startswith("gate.")},
                                                     meta["gate"].get("config", {}))
        tables = {k[7:]: v.numpy() for k, v in t.items() if k.startswith("tables.")}
        try:
            maps = maps_from_meta(meta, path, cls.GATE)
        except ValueError as e:
            raise ArtifactError(str(e)) from None
        return cls(head, gate, meta["threshold"], meta["max_skip"], meta["hidden_layer"], tables,
                   meta.get("copy_trust"), meta["depth"], meta, None if maps is None else maps[cls.GATE])

    @classmethod
    def load(cls, path: Path, meta: dict, small=None) -> "EagleDrafter":
        """The drafter of a folder whose drafter.json (`meta`) gate/model/load.py read and checked."""
        from safetensors.torch import load_file

        return cls.from_tensors(load_file(str(path / EAGLE_TENSORS)), meta, path)


EAGLE_FORMAT = "skipgate-eagle/1"
EAGLE_TENSORS = "eagle.safetensors"
EAGLE = Format(EAGLE_FORMAT, "a feature-head drafter (train.py fit --drafter eagle)", ("head", "gate"),
               EagleDrafter.load)


def draft_index(head: FeatureHead) -> torch.Tensor:
    """Token id -> index in the head's draft vocabulary, -1 outside it."""
    index = torch.full((head.vocab_size,), -1, dtype=torch.long)
    index[head.draft_ids] = torch.arange(head.n_draft)
    return index


def draft_vocab(argmax, n: int, must: Sequence[int] = ()) -> torch.Tensor:
    """The n most frequent greedy tokens (ties by id), plus `must`; sorted ids."""
    counts = np.bincount(np.asarray(argmax, dtype=np.int64))
    order = np.lexsort((np.arange(len(counts)), -counts))
    top = [int(t) for t in order[:n] if counts[t] > 0]
    return torch.tensor(sorted(set(top) | set(int(m) for m in must)), dtype=torch.long)


__all__ = ["FeatureHead", "ChainCache", "EagleDrafter", "EAGLE", "level_mask", "draft_index", "draft_vocab",
           "candidate_features", "gate_feature_names", "rotary", "apply_rotary"]
