"""The settings of `train.py fit`, listed once.

Every setting is one field of `FitConfig`: its default, its help text, and the training stage whose cached
result it changes (the stage cache key hashes exactly those fields). `add_arguments` turns the fields into the
command's options (--n-ctx for n_ctx, ...) and `options_from_args` reads them back; fields marked cli=False are
settings of the Python API (`fit(..., d_tok=8)`) that the command line does not expose.

Every numeric setting has a range (LIMITS below), checked before any work by `FitConfig.problem()`: a value out of
range, nan or infinite is one `error:` line naming the option. Stages: "data", "heads", "mode", "gates",
"calibration" (not cached), "eagle", "router" (not cached).
What each stage covers and why: docs/training.md#the-settings-of-trainpy-fit-gatetrainconfigpy.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields

INF = math.inf
# field -> (low, high, low excluded, high excluded); every value must also be finite
LIMITS = {
    "seed": (0, 2 ** 63 - 1, False, False), "target_precision": (0.5, 1, False, True), "delta": (0, 1, True, True),
    "max_skip": (2, INF, False, False), "n_ctx": (1, INF, False, False), "restricted": (1, INF, False, False),
    "d_tok": (1, INF, False, False), "d_hid": (1, INF, False, False), "width": (1, INF, False, False),
    "epochs": (0, INF, True, False), "future_epochs": (0, INF, True, False), "batch": (1, INF, False, False),
    "soft_weight": (0, 1, False, False), "reg_weight": (0, INF, False, False), "min_steps": (0, INF, False, False),
    "n_pca": (1, INF, False, False), "gate_frac": (0, 1, True, True), "max_train": (2, INF, False, False),
    "max_gate_pairs": (1, INF, False, False), "max_val_pairs": (1, INF, False, False),
    "copy_max_n": (0, INF, False, False), "map_frac": (0, 1, True, True), "eagle_vocab": (2, INF, False, False),
    "eagle_window": (2, INF, False, False),
    "eagle_batch": (1, INF, False, False), "eagle_depth": (1, INF, False, False), "eagle_epochs": (0, INF, True, False),
    "eagle_lr": (0, INF, True, False), "router_pca": (1, INF, False, False), "router_emb_pca": (1, INF, False, False),
    "router_topk": (1, INF, False, False), "router_max_skip": (1, INF, False, False), "threads": (0, INF, False, False),
}


def interval(low, high, lo_open: bool, hi_open: bool) -> str:
    """The range in words: '>= 1', '> 0', 'in [0.5, 1)'."""
    if high == INF:
        return f"{'>' if lo_open else '>='} {low:g}"
    return f"in {'(' if lo_open else '['}{low:g}, {high:g}{')' if hi_open else ']'}"


def setting(default, help: str, stage: str, cli: bool = True, choices: tuple | None = None):
    """A FitConfig field: default value plus metadata (help text, stage, whether it is a command-line option)."""
    return field(default=default, metadata={"help": help, "stage": stage, "cli": cli, "choices": choices})


@dataclass
class FitConfig:
    drafter: str = setting(
        "heads", "what drafts: the word-completion and future heads over one stale hidden state (heads), or an "
                 "EAGLE-style feature head that drafts the big model's hidden states step by step (eagle), or a router "
                 "that scores a small model's token from the small model's features (router: records of two "
                 "models)", "data",
        choices=("heads", "eagle", "router"))
    seed: int = setting(0, "seed of every random choice (folds, batches, initialisation)", "heads")
    target_precision: float = setting(
        0.99, "calibrate the gate so skipped tokens equal the big model's greedy token this often", "calibration")
    delta: float = setting(0.1, "the precision guarantee holds with probability >= 1 - delta (Learn-then-Test)",
                           "calibration")
    max_skip: int = setting(4, "the big model runs at least once every MAX_SKIP positions (the policy skips while "
                               "since_big < MAX_SKIP); future heads predict t+2 .. t+MAX_SKIP", "heads")
    layer: str = setting("last", "big-model hidden layer the drafter reads (HF numbering; 'last' = n_layers)",
                         "data")
    n_ctx: int = setting(8, "tokens the word head reads", "heads")
    restricted: int = setting(2048, "restricted vocabulary size", "heads")
    d_tok: int = setting(64, "word head: dimensions per context token", "heads", cli=False)
    d_hid: int = setting(128, "word head: dimensions of the projected stale hidden state", "heads", cli=False)
    width: int = setting(512, "word head MLP width", "heads")
    epochs: float = setting(4.0, "word head epochs", "heads")
    future_epochs: float = setting(4.0, "future heads epochs", "heads")
    batch: int = setting(512, "head training batch size", "heads", cli=False)
    soft_weight: float = setting(0.5, "weight of the big model's top-k distribution in the heads' loss", "heads",
                                 cli=False)
    reg_weight: float = setting(1.0, "weight of the hidden-state regression in the heads' loss", "heads", cli=False)
    min_steps: int = setting(300, "at least this many optimiser steps per head", "heads", cli=False)
    n_pca: int = setting(8, "principal components of the hidden state among the gate features", "heads", cli=False)
    predictor: str = setting("auto", "which head's top token is the candidate (auto: best validation accuracy)",
                             "mode", choices=("auto", "word", "future", "mix"))
    word_inputs: str = setting(
        "tokens+hidden", "word head inputs: the last tokens only (word completion from the text alone) or also "
                         "the stale big hidden state", "heads", choices=("tokens", "tokens+hidden"))
    gate_frac: float = setting(
        0.25, "share of the train split (in chunks of 512 positions) kept from the heads to train the gate", "heads")
    max_train: int = setting(400000, "cap on head training positions", "heads")
    max_gate_pairs: int = setting(300000, "cap on the (t, s) pairs the gates are trained on", "gates", cli=False)
    max_val_pairs: int = setting(400000, "cap on the validation pairs (predictor mode, calibration)", "mode",
                                 cli=False)
    copy_max_n: int = setting(
        12, "the copy rule (prompt lookup) looks for the last N tokens earlier in the context; the drafter takes its "
            "candidate where its estimated precision (by match length, up to 64) beats the gate's (0: no copy rule)",
        "calibration")
    map_frac: float = setting(
        0.3, "share of the calibration pairs (in stretches of positions) the precision maps are fitted on; the "
             "threshold is certified on the rest", "calibration")
    eagle_vocab: int = setting(8192, "eagle: draft vocabulary, the most frequent greedy tokens of the training "
                                     "records", "eagle")
    eagle_layers: str = setting("eagle3", "eagle: the big model's three layers the head fuses, as L1,L2,L3 (HF "
                                          "numbering: l is the input of block l; middle, last, negative from the "
                                          "end) or eagle3: 2, n/2, n-3, EAGLE-3's choice, which llama.cpp's "
                                          "converter also makes (record them with --layers eagle3)", "eagle")
    eagle_mlp: int = setting(0, "eagle: the head's MLP width (0: the big model's)", "eagle")
    eagle_window: int = setting(64, "eagle: positions per training window", "eagle")
    eagle_batch: int = setting(16, "eagle: windows per optimiser step", "eagle")
    eagle_depth: int = setting(4, "eagle: draft steps trained from each anchor (training-time test); the "
                                  "drafter skips at most this many positions per big pass", "eagle")
    eagle_epochs: float = setting(2.0, "eagle: epochs over the training windows", "eagle")
    eagle_lr: float = setting(1e-3, "eagle: peak learning rate (AdamW, warmup + cosine)", "eagle")
    router_pca: int = setting(32, "router: principal components of the small model's hidden state (and of the "
                                  "big model's, with --router-big-hidden)", "router")
    router_emb_pca: int = setting(16, "router: principal components of the candidate token's input embedding",
                                  "router")
    router_topk: int = setting(8, "router: top-k probabilities of the small model among its features", "router")
    router_big_hidden: bool = setting(False, "router: also read the big model's stale hidden state (the big "
                                             "backend then computes it; skips are bounded by --max-skip)", "router")
    router_max_skip: int = setting(64, "router without the big hidden state: most consecutive small-model tokens",
                                   "router")
    dtype: str = setting("float32", "dtype the big model is loaded in (for its embeddings)", "heads", cli=False)
    threads: int = setting(
        1, "torch intra-op threads (0: torch's default). The heads are small: on a busy 2-core machine 1 thread was "
           "1.4x faster than 2; results are deterministic for a seed and thread count", "heads")

    @classmethod
    def from_options(cls, **opts) -> "FitConfig":
        """FitConfig from keyword options; an unknown name is a TypeError naming it."""
        unknown = set(opts) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown fit options: {sorted(unknown)}")
        return cls(**opts)

    def problem(self) -> str | None:
        """Why a setting is out of its range (LIMITS; nan and infinities never pass), None if all are fine."""
        for name, (low, high, lo_open, hi_open) in LIMITS.items():
            v = getattr(self, name)
            ok = math.isfinite(v) and (v > low if lo_open else v >= low) and (v < high if hi_open else v <= high)
            if not ok:
                shown = v if isinstance(v, int) else f"{v:g}"
                return f"--{name.replace('_', '-')} {shown}: must be {interval(low, high, lo_open, hi_open)}"
        if self.drafter == "eagle" and self.eagle_window <= self.eagle_depth:
            return (f"--eagle-window {self.eagle_window}: must be more than --eagle-depth {self.eagle_depth} (each "
                    "window trains every draft depth)")
        return None

    def stage_settings(self, stage: str) -> dict:
        """The settings whose change invalidates the cached result of `stage`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["stage"] == stage}

    def as_dict(self) -> dict:
        return asdict(self)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """One --option per command-line field of FitConfig (type and default from the field)."""
    for f in fields(FitConfig):
        if not f.metadata["cli"]:
            continue
        kw = {"default": f.default, "help": f.metadata["help"]}
        if f.metadata["choices"]:
            kw["choices"] = list(f.metadata["choices"])
        elif isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif not isinstance(f.default, str):
            kw["type"] = type(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), **kw)


def options_from_args(args: argparse.Namespace) -> dict:
    """The FitConfig options parsed by a parser set up with add_arguments."""
    return {f.name: getattr(args, f.name) for f in fields(FitConfig) if f.metadata["cli"]}
