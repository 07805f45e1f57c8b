"""The feature head in EAGLE-3's layout: fc fuses the big model's states at a low, a middle and a high layer; one
decoder layer reads them with the next token's embedding; lm_head scores a draft vocabulary (FR-Spec's most frequent
tokens, mapped back to the big model's ids).

    logits = ChainCache(head).draft(ids, hiddens)                    # draft-vocabulary logits for len(ids)
    tok, score = drafter.propose(ids, hiddens, since_big)            # EagleDrafter: every computed hidden row

FeatureHead.forward trains every chain depth at once (`level_mask`, EAGLE-3's training-time test); ChainCache keeps
one KV entry per text position, "true" over the big model's rows and "chain" over the head's own outputs, and
runs an int8 copy of the head (Int8Linear). The gate scores the head's token and the copy rule's
(candidate_features); its pick and the copy rule's meet as estimated precisions (drafter.json's precision_maps,
gate/model/precision.py). Format skipgate-eagle/2 (`EAGLE`, eagle.safetensors); train.py export writes the
Hugging Face EAGLE-3 folder that vLLM, SGLang and llama.cpp read. docs/drafters.md.
"""
from __future__ import annotations

import copy
import math
import warnings
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
    """cos, sin [len(pos), dim] of rotary position embeddings (the half-split layout of Hugging Face LLaMA)."""
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
    """EAGLE-3's draft layer (the layout vLLM, SGLang and llama.cpp read; docs/drafters.md):

        g = fc(big model's states at `layers`, concatenated)              # once per position the big model computed
        x = layer(norm(embed(next token)) ++ hidden_norm(g)), residual g  # one decoder layer, q/k/v read 2H
        logits = lm_head(norm(x))                                         # over the draft vocabulary
    The chain's next step takes x as its g. Training runs every chain depth at once (training-time test,
    `level_mask`); ChainCache keeps one KV entry per text position at decode time. `feat_scale` (1/RMS of each
    input column, from the training data) is folded into fc on export."""

    def __init__(self, vocab_size: int, hidden_size: int, n_draft: int, layers: Sequence[int] = (0,),
                 n_heads: int | None = None, n_kv_heads: int | None = None, mlp: int | None = None,
                 rope_theta: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        D = hidden_size
        self.vocab_size, self.hidden_size, self.n_draft, self.layers = vocab_size, D, n_draft, tuple(layers)
        self.n_heads = n_heads or max(1, D // 64)
        self.n_kv_heads = n_kv_heads or self.n_heads
        self.mlp, self.rope_theta, self.eps = mlp or 2 * D, float(rope_theta), float(eps)
        hd = D // self.n_heads
        if D % self.n_heads or hd % 2 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"hidden size {D} does not split into {self.n_heads} heads of even width sharing "
                             f"{self.n_kv_heads} key/value heads")
        self.head_dim, F_in = hd, len(self.layers) * D
        self.register_buffer("embed", torch.zeros(vocab_size, D))         # big model's input embedding
        self.register_buffer("draft_ids", torch.zeros(n_draft, dtype=torch.long))
        self.register_buffer("feat_scale", torch.ones(F_in))
        self.fc = nn.Linear(F_in, D, bias=False)
        self.input_norm, self.hidden_norm = nn.RMSNorm(D, eps=eps), nn.RMSNorm(D, eps=eps)
        self.qkv = nn.Linear(2 * D, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.o = nn.Linear(self.n_heads * hd, D, bias=False)
        self.post_norm, self.norm = nn.RMSNorm(D, eps=eps), nn.RMSNorm(D, eps=eps)
        self.up = nn.Linear(D, 2 * self.mlp, bias=False)                  # gate and up, fused
        self.down = nn.Linear(self.mlp, D, bias=False)
        self.lm_head = nn.Linear(D, n_draft, bias=False)
        self._rope = (torch.zeros(0, hd), torch.zeros(0, hd))

    def config(self) -> dict:
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "n_draft": self.n_draft,
                "layers": list(self.layers), "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "mlp": self.mlp, "rope_theta": self.rope_theta, "eps": self.eps}

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self) -> int:
        """2 x multiply-accumulates of one draft step (fc, on the big model's rows only, and attention over the
        context not counted)."""
        return 2 * sum(m.weight.numel() for m in (self.qkv, self.o, self.up, self.down, self.lm_head))

    # -- pieces ---------------------------------------------------------------------------------------------
    def fuse(self, h: torch.Tensor) -> torch.Tensor:
        """g [.., D] from the big model's concatenated layer states h [.., len(layers) * D]."""
        return self.fc(h.float() * self.feat_scale)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(pos.max()) + 1 if len(pos) else 0
        if n > len(self._rope[0]):                                       # a table grown by doubling
            self._rope = rotary(torch.arange(max(n, 2 * len(self._rope[0]), 256)), self.head_dim, self.rope_theta)
        return self._rope[0][pos], self._rope[1][pos]

    def project(self, g: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor):
        """q [.., T, heads, hd], k, v [.., T, kv heads, hd] of entries (g [.., T, D], next tokens [.., T]) at pos [T]."""
        *lead, T, _ = g.shape
        x = torch.cat([self.input_norm(self.embed[tokens]), self.hidden_norm(g)], -1)
        q, k, v = self.qkv(x).view(*lead, T, -1, self.head_dim).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], -2)
        cos, sin = self.rope(pos)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(self, g: torch.Tensor, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """x [.., T, D], the entries' pre-norm outputs: attention (q over k, v; a bool mask, None: every key),
        residual g, MLP."""
        att = F.scaled_dot_product_attention(q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3),
                                             attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        x = g + self.o(att.transpose(-2, -3).flatten(-2))
        gate, up = self.up(self.post_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary from pre-norm outputs."""
        return self.lm_head(self.norm(x))

    # -- training: every level at once --------------------------------------------------------------------
    def forward(self, h: torch.Tensor, next_tokens: torch.Tensor, depth: int = 1) -> list[torch.Tensor]:
        """Pre-norm outputs per level: h [B, L, len(layers) * D] the big model's states at positions 0..L-1,
        next_tokens [B, L] the token at each position + 1. Level d's row i predicts the token at i+2 from a chain
        anchored at i-d+1 (rows i < d-1 have no anchor)."""
        B, L, _ = h.shape
        pos = torch.arange(L)
        g = self.fuse(h)
        keys, vals, outs = [], [], []
        for d in range(1, depth + 1):
            if d > 1:
                g = F.pad(outs[-1][:, :-1], (0, 0, 1, 0))              # level d-1's output at i-1
            q, k, v = self.project(g, next_tokens, pos)
            keys.append(k)
            vals.append(v)
            outs.append(self.finish(g, q, torch.cat(keys, 1), torch.cat(vals, 1), level_mask(L, d)))
        return outs


class ChainCache:
    """The feature head's KV cache over one text at decode time (see the module docstring, "Entries").

    `draft(ids, hiddens)` returns the draft-vocabulary logits for position len(ids): it keeps the entries whose
    inputs are unchanged, adds true entries for positions the big model computed since (hiddens: its states
    at positions 0 .. big_cached-1, big_cached = len(hiddens)), then chain entries up to len(ids)-2. Keys and
    values live in buffers grown by doubling; a chain step is one entry (the batch-1 path: the same functions
    as training, no mask).
    """

    def __init__(self, head: FeatureHead):
        self.head = head
        self.reset()

    def reset(self) -> None:
        h = self.head
        self._k = torch.zeros(64, h.n_kv_heads, h.head_dim)
        self._v = torch.zeros_like(self._k)
        self._x = torch.zeros(64, h.hidden_size)
        self.n_entries = 0
        self.tokens: list[int] = []      # ids[0 .. n_entries]: the text the entries were computed from
        self.n_true = 0
        self.steps = 0                   # entries computed (the ledger's draft steps)

    @property
    def preds(self) -> torch.Tensor:
        return self._x[:self.n_entries]

    def crop(self, n: int) -> None:
        self.n_entries = max(0, min(n, self.n_entries))
        self.tokens = self.tokens[:self.n_entries + 1] if self.n_entries else []
        self.n_true = min(self.n_true, self.n_entries)

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
            g = self.head.fuse(torch.as_tensor(hiddens[n:big_cached]))
            self._add(g, torch.as_tensor(list(ids[n + 1:big_cached + 1])), n)
            self.n_true = big_cached
        while self.n_entries < len(ids) - 1:          # chain entries, one step each
            j = self.n_entries
            self._add(self._x[j - 1:j], torch.as_tensor([ids[j + 1]]), j)
        self.tokens = list(ids)
        return self.head.logits(self._x[self.n_entries - 1])

    def _add(self, g: torch.Tensor, tokens: torch.Tensor, start: int) -> None:
        """Entries for positions start .. start+T-1, attending to the cache and causally to each other."""
        T, end = len(tokens), start + len(tokens)
        if end > len(self._x):
            grow = max(end, 2 * len(self._x))
            self._k, self._v, self._x = (torch.cat([b, b.new_zeros(grow - len(b), *b.shape[1:])])
                                         for b in (self._k, self._v, self._x))
        q, k, v = self.head.project(g, tokens, torch.arange(start, end))
        self._k[start:end], self._v[start:end] = k, v
        mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool).tril(start)
        self._x[start:end] = self.head.finish(g, q, self._k[:end], self._v[:end], mask)
        self.n_entries = end
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


def candidate_rows(head_tok: int, p1: float, p2: float, entropy: float, p_copy: float, copy_tok: int,
                   copy_len: int, depth: int, last_tok: int, tables: dict, max_depth: int):
    """candidate_features for one proposal, the decode path's: (cands [2], valid [2], X [2, F]) from Python
    floats in one array (the batched version's numpy calls on 1-element arrays cost ~0.4 ms a proposal).
    Equal to candidate_features (tests/test_eagle.py)."""
    agree = copy_tok == head_tok and copy_tok >= 0
    cands = (head_tok, copy_tok if copy_tok >= 0 and not agree else -1)
    cls = token_class_from_tables([last_tok, last_tok], [max(c, 0) for c in cands], tables["cls"],
                                  tables["ends_alnum"])
    tail = [math.log1p(copy_len), float(copy_len >= COPY_SPAN)]
    d = [0.0] * max_depth
    d[min(max(depth, 1), max_depth) - 1] = 1.0
    rows = []
    for pc, ih, ca, c in ((p1, 1.0, float(agree), cls[0]), (p_copy, 0.0, 1.0, cls[1])):
        onehot = [0.0] * len(CLASSES)
        onehot[int(c)] = 1.0
        pc32 = float(np.float32(pc))
        rows.append([math.log(pc32 + 1e-6), pc32, ih, p1, p1 - p2, entropy, ca] + tail + d + onehot)
    return np.array(cands), np.array([c >= 0 for c in cands]), np.array(rows, dtype=np.float32)


class EagleDrafter(Drafter):
    """The Drafter contract (gate/model/base.py) around the feature head, its KV cache, the copy rule and
    a gate over both candidates; like the heads drafter, the gate's pick and the copy rule's candidate are
    compared as estimated precisions (gate.model.precision: `maps`, one SourceMaps). The copy rule is asked
    first: where its estimate alone beats anything the gate's map can give, the head is not run (its chain
    entries are computed later, if ever needed). It reads every hidden row the big model computed
    (reads_all_hidden), so the decode loop keeps them and the cache turns them into true entries. When it proposes
    its head's token it leaves the head's distribution in `last_logits` (over the whole vocabulary, -inf outside
    the draft vocabulary): sampled decoding then drafts a sample of it, and speculative sampling accepts with
    min(1, q/p) (EAGLE's sampling)."""
    reads_all_hidden = True
    GATE = "gate"       # the name of its one gate (drafter.json's calibration and precision_maps)

    def __init__(self, head: FeatureHead, gate, threshold: float, max_skip: int, tables: dict, depth: int,
                 meta: dict | None = None, maps: SourceMaps | None = None, int8: bool = True):
        self.head, self.gate = head.eval(), gate
        self.maps = maps
        # the best estimate the gate's pick can get: a copy estimated at least this high is proposed without the head
        self.gate_ceiling = max(float(m.y[-1]) for m in maps.gate.values()) if maps is not None else math.inf
        self.threshold, self.max_skip = float(threshold), int(max_skip)
        self.hidden_layer = head.layers if len(head.layers) > 1 else head.layers[0]   # what the loop asks for
        self.depth = int(depth)     # chain steps the head and its gate were trained for; beyond: copies only
        self.tables, self.meta = tables, meta or {}
        self.fast = int8_head(self.head) if int8 else None     # the decode path's copy (None: float32)
        self.cache = ChainCache(self.fast or self.head)
        self.copies = CopyIndex(maps.max_n or MAX_N if maps is not None else MAX_N)
        self.extend = maps.extend if maps is not None else 0
        self.index = draft_index(head)

    @property
    def scoring(self):
        """What gate.model.precision.combine_sources takes: the SourceMaps, or None (the gate's pick alone)."""
        return self.maps

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
        self.last_logits = None
        free = self.propose_free(ids)
        if free is not None and free[1] >= self.gate_ceiling:     # the head could not outbid this copy
            return free[0], free[1] if since_big < self.max_skip else 0.0
        logits = self.cache.draft(ids, hiddens)
        p = torch.softmax(logits, -1)
        (p1, p2), (i1, _) = p.topk(2)
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum()) / math.log(len(p))
        if free is None:                              # propose_free synced the index unless it had no maps to ask
            self.copies.sync(ids)
        copy_tok, copy_len = self.copies.query(self.extend)   # the gate reads the length up to max_n, the map all
        i = int(self.index[copy_tok]) if copy_tok >= 0 else -1
        p_copy = float(p[i]) if i >= 0 else 0.0
        cands, valid, X = candidate_rows(int(self.head.draft_ids[i1]), float(p1), float(p2), entropy, p_copy,
                                         copy_tok, min(copy_len, self.copies.max_n), min(since_big, self.depth),
                                         ids[-1], self.tables, self.depth)
        scores = self.gate.score(X).numpy()
        scores[~valid] = -1.0
        if since_big > self.depth:      # untrained chain depth: only the copy rule can skip here
            scores[:] = -1.0                                                      # (-1: no gate candidate)
        k = int(scores.argmax())
        tok, score, used = combine_sources(cands[k:k + 1], scores[k:k + 1], np.array([copy_tok]),
                                           np.array([copy_len]), self.scoring)
        if k == 0 and not used[0]:                    # the head's own distribution, when its token is proposed
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
        meta.update(format=EAGLE_FORMAT, hidden_layer=list(self.head.layers), max_skip=self.max_skip,
                    threshold=self.threshold, head=self.head.config(), gate={"kind": self.gate.kind},
                    features=gate_feature_names(self.depth), depth=self.depth)
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
        return cls(head, gate, meta["threshold"], meta["max_skip"], tables, meta["depth"], meta,
                   None if maps is None else maps[cls.GATE])

    @classmethod
    def load(cls, path: Path, meta: dict, small=None) -> "EagleDrafter":
        """The drafter of a folder whose drafter.json (`meta`) gate/model/load.py read and checked."""
        from safetensors.torch import load_file

        return cls.from_tensors(load_file(str(path / EAGLE_TENSORS)), meta, path)


EAGLE_FORMAT = "skipgate-eagle/2"     # /1: the feature head before EAGLE-3's layout (retrain)
EAGLE_TENSORS = "eagle.safetensors"
EAGLE = Format(EAGLE_FORMAT, "a feature-head drafter (train.py fit --drafter eagle)", ("head", "gate"),
               EagleDrafter.load)


class Int8Linear(nn.Module):
    """A linear layer through fbgemm's int8 kernels (weights per output channel, activations per call, as torch's
    dynamic quantisation does): at batch 1 the head reads a quarter of the bytes, several times faster than
    float32 on a CPU (docs/drafters.md). Written with the two torch ops because torch.ao's wrappers are
    deprecated; inference only."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():          # quantised tensors are deprecated; the kernels are not replaced yet
            warnings.simplefilter("ignore")
            wq = torch.quantize_per_channel(w, scale, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(wq, None if lin.bias is None else lin.bias.detach())
        self.out_features = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, True)
        return y.view(*x.shape[:-1], self.out_features)


def int8_head(head: FeatureHead) -> FeatureHead | None:
    """A copy of the head whose matrices run in int8 (Int8Linear), or None where this torch has no int8 kernels."""
    try:
        fast = copy.deepcopy(head).eval()
        for name in ("fc", "qkv", "o", "up", "down", "lm_head"):
            setattr(fast, name, Int8Linear(getattr(head, name)))
        fast(torch.zeros(1, 2, len(head.layers) * head.hidden_size), torch.zeros(1, 2, dtype=torch.long))
        return fast
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


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
           "int8_head",
           "candidate_features", "gate_feature_names", "rotary", "apply_rotary"]
