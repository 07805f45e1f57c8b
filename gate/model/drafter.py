"""The Drafter: the trained heads + gate as one artifact the `gate` decode policy loads.

    drafter = load_drafter(path, big_info)       # refuses another tokenizer (TokenizerMismatch)
    tok, score = drafter.propose(ids, hidden, since_big)

`propose` returns the candidate for position len(ids) and the gate's estimate of P(candidate == the big model's
greedy token there). `hidden` is the big model's hidden state at `drafter.hidden_layer` at the last position
p it computed; ids has p + 1 + since_big entries. The decode policy skips while score >= drafter.threshold and
since_big < drafter.max_skip, so proposals are trained and calibrated for since_big = 1 .. max_skip - 1 (the
future heads predict t+2 .. t+max_skip); for since_big >= max_skip propose still returns a candidate but with
score 0.0 (never skip).

Artifact (a folder, written by `python train.py fit`):
    drafter.json          metadata: format, big model (name, fingerprint, vocab, hidden size, layers), hidden
                          layer, max_skip, predictor mode, feature names, gates and the primary one, threshold +
                          calibration (target precision, delta, Learn-then-Test result), metrics, training data
                          (records path, splits, token counts), head sizes/FLOPs, library versions, files with
                          sha256; written last, so a folder without it is incomplete.
    drafter.safetensors   all tensors: word head (baked embedding table), future heads, hidden standardisation,
                          PCA, restricted vocabulary ids, token kinds, gates.
Every file is written to a temporary name and renamed into place; `load_drafter` checks the sha256 of each file
listed in drafter.json, so a half-rewritten folder is refused rather than half-loaded.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.errors import ProjectError
from common.files import atomic_path, write_json
from runtimes.info import ModelInfo, TokenizerMismatch
from corpus_tools.records import sha256_file
from gate.model.copyrule import CopyIndex, trust_copy
from gate.model.features import GATES, NEVER, NGRAM_ORDERS, compute_features, feature_names, pick_candidate
from gate.model.heads import ContextIndex, FutureHeads, HiddenNorm, NgramTable, WordHead

FORMAT = "skipgate-drafter/1"
META_FILE, TENSOR_FILE = "drafter.json", "drafter.safetensors"


class ArtifactError(RuntimeError, ProjectError):
    """A drafter folder that is missing, incomplete or inconsistent; the message names the path."""


class Predictor:
    """Word head + future heads + PCA + token tables: (context, stale hidden, since_big) -> candidate, features."""

    def __init__(self, word: WordHead, future: FutureHeads, norm: HiddenNorm, rids: torch.Tensor,
                 tables: dict[str, np.ndarray], pca_mean: torch.Tensor, pca_proj: torch.Tensor,
                 mode: str = "word", max_s: int = 3, ngram=None):
        self.word, self.future, self.norm = word.eval(), future.eval(), norm
        self.rids = rids.long()
        self.tables = {"kind": np.asarray(tables["kind"], dtype=np.int8),
                       "cls": np.asarray(tables["cls"], dtype=np.int8),
                       "ends_alnum": np.asarray(tables["ends_alnum"], dtype=bool)}
        self.pca_mean, self.pca_proj = pca_mean.float(), pca_proj.float()
        self.mode, self.max_s = mode, max_s
        self.n_ctx, self.pad = word.n_ctx, word.pad
        self.ngram = ngram
        self.rmap = np.full(word.vocab_size, len(self.rids), dtype=np.int64)
        self.rmap[self.rids.numpy()] = np.arange(len(self.rids))

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.max_s, self.pca_proj.shape[1])

    def context(self, ids: Sequence[int]) -> torch.Tensor:
        ctx = list(ids[-self.n_ctx:])
        return torch.tensor([self.pad] * (self.n_ctx - len(ctx)) + ctx, dtype=torch.long)

    @torch.inference_mode()
    def run(self, ctx: torch.Tensor, hidden: torch.Tensor, s: torch.Tensor, copy: dict | None = None,
            mode: str | None = None) -> dict:
        """ctx [B, N] (pad = vocab_size), hidden [B, D] raw big hidden at p, s [B] since_big (clamped to max_s),
        copy: in-context copy statistics per order (gate.model.heads.ContextIndex / context_copy_stats)."""
        s = s.long().clamp(1, self.max_s)
        hn = self.norm(hidden.float())
        pw = torch.softmax(self.word(ctx.long(), hn, s).float(), -1)
        pf = torch.softmax(self.future(hn, s).float(), -1)
        z = (hn - self.pca_mean) @ self.pca_proj
        ng = self.ngram.lookup(ctx.numpy(), self.pad) if self.ngram is not None else None
        out = compute_features(pw, pf, mode or self.mode, self.rids, self.rmap, ctx[:, -1].long(), s, z,
                               self.tables, self.max_s, ng, copy)
        out["pw"], out["pf"] = pw, pf
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {f"word.{k}": v for k, v in self.word.state_dict().items()}
        t.update({f"future.{k}": v for k, v in self.future.state_dict().items()})
        t.update({"norm.mean": self.norm.mean, "norm.std": self.norm.std, "rids": self.rids,
                  "pca.mean": self.pca_mean, "pca.proj": self.pca_proj})
        t.update({f"tables.{k}": torch.from_numpy(v.copy()) for k, v in self.tables.items()})
        if self.ngram is not None:
            t.update({f"ngram.{k}": v for k, v in self.ngram.tensors().items()})
        return t

    def config(self) -> dict:
        return {"word": self.word.config(), "future": self.future.config(), "mode": self.mode,
                "max_s": self.max_s, "n_restricted": int(len(self.rids)), "n_pca": int(self.pca_proj.shape[1]),
                "ngram_entries": self.ngram.n_entries() if self.ngram is not None else 0}

    @classmethod
    def from_tensors(cls, t: dict, cfg: dict) -> "Predictor":
        word = WordHead(**cfg["word"])
        word.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("word.")})
        future = FutureHeads(**cfg["future"])
        future.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("future.")})
        norm = HiddenNorm(len(t["norm.mean"]), t["norm.mean"], t["norm.std"])
        tables = {k[7:]: v.numpy() for k, v in t.items() if k.startswith("tables.")}
        ng = {k[6:]: v for k, v in t.items() if k.startswith("ngram.")}
        ngram = NgramTable.from_tensors(ng, cfg["word"]["vocab_size"]) if ng else None
        return cls(word, future, norm, t["rids"], tables, t["pca.mean"], t["pca.proj"], cfg["mode"], cfg["max_s"],
                   ngram)

    def cost(self, big_params: int | None = None) -> dict:
        w, f = self.word.flops_per_token(), self.future.flops_per_token()
        out = {"word_head_params": self.word.n_params(), "future_heads_params": self.future.n_params(),
               "word_head_flops_per_token": w, "future_head_flops_per_token": f,
               "drafter_flops_per_token": w + f + 2 * self.pca_proj.numel()}
        if big_params:
            out["big_flops_per_token"] = 2 * big_params
            out["drafter_flops_vs_big"] = out["drafter_flops_per_token"] / (2 * big_params)
        return out


class Drafter:
    """The drafter contract (propose / start / threshold / max_skip / hidden_layer) around a Predictor and a
    trained gate."""

    def __init__(self, predictor: Predictor, gates: dict, primary: str, threshold: float, max_skip: int,
                 hidden_layer: int, meta: dict | None = None, copy_trust: np.ndarray | None = None):
        self.predictor, self.gates, self.primary = predictor, gates, primary
        self.threshold, self.max_skip, self.hidden_layer = float(threshold), int(max_skip), int(hidden_layer)
        self.meta = meta or {}
        self.index = ContextIndex(NGRAM_ORDERS)
        # the copy rule's trust per match length (gate.model.copyrule.trust_table); None: an artifact from
        # before the copy rule was part of the drafter, which proposes what its gate picks alone
        self.copy_trust = None if copy_trust is None else np.asarray(copy_trust, dtype=np.float32)
        self.copies = CopyIndex(len(self.copy_trust) - 1) if self.copy_trust is not None else None

    def start(self) -> None:
        """A new text begins (the decode policy calls this): forget the in-context copy statistics."""
        self.index.reset()
        if self.copies is not None:
            self.copies.reset()

    @property
    def gate(self):
        return self.gates[self.primary]

    def score(self, out: dict, gate: str | None = None) -> torch.Tensor:
        """Gate scores [B, K] for the candidates of Predictor.run's output."""
        X = out["X"]
        return self.gates[gate or self.primary].score(X.reshape(-1, X.shape[-1])).reshape(X.shape[:2])

    def propose(self, ids: Sequence[int], hidden: torch.Tensor, since_big: int) -> tuple[int, float]:
        if since_big < 1:
            raise ValueError(f"since_big must be >= 1 (got {since_big}): the big model's own token comes first")
        if hidden is None:
            raise ValueError(f"the drafter needs the big model's hidden state at layer {self.hidden_layer}")
        if not ids:
            raise ValueError("empty ids")
        self.index.sync(ids)
        tops, ps, tots = self.index.query()
        copy = {}
        for n in range(len(tops)):
            copy[f"top{n + 1}"], copy[f"p{n + 1}"], copy[f"n{n + 1}"] = (np.array([tops[n]]), np.array([ps[n]]),
                                                                         np.array([tots[n]]))
        h = torch.as_tensor(hidden).reshape(1, -1)
        out = self.predictor.run(self.predictor.context(ids)[None], h, torch.tensor([since_big]), copy)
        _, tok, score = pick_candidate(self.score(out), out)
        if self.copies is not None:
            self.copies.sync(ids)
            copy_tok, copy_len = self.copies.query()
            tok, score, _ = trust_copy(tok, score, np.array([copy_tok]), np.array([copy_len]), self.copy_trust)
        score = float(score[0])
        if since_big >= self.max_skip:
            score = 0.0
        return int(tok[0]), score

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        tensors = {f"pred.{k}": v for k, v in self.predictor.tensors().items()}
        for name, g in self.gates.items():
            tensors.update({f"gate.{name}.{k}": v for k, v in g.state().items()})
        meta = dict(self.meta)
        meta.update(format=FORMAT, hidden_layer=self.hidden_layer, max_skip=self.max_skip,
                    threshold=self.threshold, primary_gate=self.primary,
                    gates={n: {"kind": g.kind, "config": g.config()} for n, g in self.gates.items()},
                    predictor=self.predictor.config(), features=self.predictor.feature_names,
                    copy_trust=None if self.copy_trust is None else [float(x) for x in self.copy_trust])
        self.meta = write_artifact(path, TENSOR_FILE, tensors, meta)
        return Path(path)


def write_artifact(path: str | Path, tensor_file: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """An artifact folder: the tensors (safetensors, written atomically), then META_FILE with their sha256 and the
    library versions, written last (a folder without it is unfinished). Returns the metadata written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / tensor_file) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        sha = sha256_file(tmp)
    meta = {**meta, "files": {tensor_file: sha}, "versions": library_versions()}
    write_json(path / META_FILE, meta)
    return meta


def library_versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    mf = path / META_FILE
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such drafter folder (build one with `python train.py fit`)")
    if not mf.is_file():
        raise ArtifactError(f"{mf}: missing - {path} is not a finished drafter artifact (fit interrupted?)")
    try:
        meta = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # garbled: named here, not as a KeyError later
        raise ArtifactError(f"{mf}: not valid JSON ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{mf}: cannot read it ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{mf}: not a drafter description (a JSON {type(meta).__name__}, not an object)")
    from gate.model.eagle import EAGLE_FORMAT
    from gate.model.router import ROUTER_FORMAT

    keys = {FORMAT: ("predictor", "gates", "primary_gate"), EAGLE_FORMAT: ("head", "gate"),
            ROUTER_FORMAT: ("small_model", "gate", "features", "threshold")}
    if meta.get("format") not in keys:
        raise ArtifactError(f"{mf}: format {meta.get('format')!r}, this code reads {' or '.join(map(repr, keys))}")
    missing = [k for k in ("big_model", *keys[meta["format"]], "max_skip", "hidden_layer", "files") if k not in meta]
    if missing or not isinstance(meta["big_model"], dict) or not isinstance(meta.get("gates", {}), dict):
        raise ArtifactError(f"{mf}: damaged drafter description ("
                            f"{'missing ' + ', '.join(missing) if missing else 'big_model or gates not an object'})")
    return meta


KINDS = {"skipgate-drafter": "the heads drafter (train.py fit)",
         "skipgate-eagle": "a feature-head drafter (train.py fit --drafter eagle)",
         "skipgate-router": "a router for a big/small pair (train.py fit --drafter router)"}


def kind_of(meta: dict) -> str:
    """What kind of artifact drafter.json describes, in words (for messages)."""
    return KINDS.get(str(meta.get("format")).split("/")[0], f"a {meta.get('format')!r} artifact")


def check_big_model(meta: dict, big_info, where: str) -> None:
    """Raise TokenizerMismatch / ArtifactError unless big_info matches the artifact's big model."""
    if big_info is None:
        return
    info = big_info.to_dict() if isinstance(big_info, ModelInfo) else dict(big_info)
    big = meta["big_model"]
    if info.get("fingerprint") != big["fingerprint"]:
        raise TokenizerMismatch(
            f"{where}: drafter trained for {big['name']!r} (tokenizer {big['fingerprint']}) but the big model "
            f"{info.get('name')!r} has tokenizer {info.get('fingerprint')}; the same text gives other token "
            "ids, so its proposals would be meaningless - retrain it with `python train.py fit` on records of "
            "this model")
    for key in ("hidden_size", "vocab_size", "n_layers"):   # one tokenizer may serve a family of sizes
        if key in info and key in big and info[key] != big[key]:
            raise ArtifactError(f"{where}: drafter expects {key} {big[key]} but {info.get('name')!r} has "
                                f"{info[key]}")
    n_layers = info.get("n_layers")
    if n_layers is not None and not 0 <= meta["hidden_layer"] <= n_layers:
        raise ArtifactError(f"{where}: drafter reads hidden layer {meta['hidden_layer']} but "
                            f"{info.get('name')!r} has layers 0..{n_layers}")


def check_files(path: Path, meta: dict) -> None:
    """Every file drafter.json lists exists and has its sha256: a half-rewritten folder is refused."""
    for name, sha in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in {path / META_FILE} but missing")
        if sha256_file(f) != sha:
            raise ArtifactError(f"{f}: sha256 differs from {path / META_FILE} (folder partly rewritten?)")


def load_drafter(path: str | Path, big_info: ModelInfo | dict | None):
    """Load an artifact folder (a Drafter, or an EagleDrafter for a feature-head artifact); refuses a big model
    with another tokenizer (TokenizerMismatch) or another hidden size / vocabulary (ArtifactError)."""
    from safetensors.torch import load_file
    path = Path(path)
    meta = read_meta(path)
    check_big_model(meta, big_info, str(path))
    check_files(path, meta)
    from gate.model.eagle import EAGLE_FORMAT, EAGLE_TENSORS, EagleDrafter
    from gate.model.router import ROUTER_FORMAT

    if meta["format"] == ROUTER_FORMAT:   # it runs the small model: the decode runtime loads it with one
        raise ArtifactError(f"{path}: a router for a big/small pair; decode with it through infer.py or "
                            "bench/decode.py (--policy gate --gate PATH), which open its small model")
    if meta["format"] == EAGLE_FORMAT:
        return EagleDrafter.from_tensors(load_file(str(path / EAGLE_TENSORS)), meta)
    t = load_file(str(path / TENSOR_FILE))
    pred = Predictor.from_tensors({k[5:]: v for k, v in t.items() if k.startswith("pred.")}, meta["predictor"])
    gates = {}
    for name, g in meta["gates"].items():
        pre = f"gate.{name}."
        gates[name] = GATES[g["kind"]].from_state({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)},
                                                  g["config"])
    return Drafter(pred, gates, meta["primary_gate"], meta.get("threshold", NEVER), meta["max_skip"],
                   meta["hidden_layer"], meta, meta.get("copy_trust"))


__all__ = ["Drafter", "Predictor", "load_drafter", "read_meta", "kind_of", "ArtifactError", "TokenizerMismatch"]
