"""`python train.py record`: run one or more models over a corpus and store what they predict at every token.

    python train.py record --model smollm2-135m --corpus runs/demo/corpus --out runs/demo/records
    accelerate launch --multi_gpu --num_processes 2 train.py record ...    # books shared between processes

Each book is tokenized once, with the first model's tokenizer, and every model reads the same ids; windows of
--context tokens, --stride apart, record every position once. Output: a records folder (corpus_tools/records.py).
`--backend llama.cpp` gives any layer on llama-architecture models (SmolLM2), the last only on others.
Resumable (a resumed run writes the same bytes); settings.json pins the settings; --out and --context are checked
and the folder locked before any work.
Tokenization, windows, runtimes, dtype, resume and scale-out in full: docs/corpus.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import ProjectError, one_line
from common.files import FolderLock, atomic_dir, check_output_dir, write_json
from corpus_tools.corpus import SPLITS, books_of_split, load_manifest, read_book
from corpus_tools.records import FORMAT, RecordsError, field_file, sha256_file
from corpus_tools.tokens import encode_text
from runtimes.backend import eagle3_layers
from runtimes.info import check_context, check_same_tokenizer
from runtimes.loading import DTYPES
from runtimes.open import BACKENDS, Opened, open_backend

HIDDEN_DTYPES = ("float16", "int8")
STATS_ROWS = 256  # rows of logits turned into float32 statistics at once: bounds the float32 copies


@dataclass(frozen=True)
class Window:
    start: int  # the window reads tokens[start:end] ...
    end: int
    first: int  # ... and records positions [first, end)


def windows(n_pos: int, context: int, stride: int) -> list[Window]:
    """Windows that record each of positions [0, n_pos) exactly once (docs/corpus.md, "Recording")."""
    out = [Window(0, min(context, n_pos), 0)] if n_pos > 0 else []
    k = 1
    while (first := context + (k - 1) * stride) < n_pos:
        out.append(Window(k * stride, min(k * stride + context, n_pos), first))
        k += 1
    return out


def batches(wins: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most batch_size each (no padding, so no attention masks)."""
    out: list[list[Window]] = []
    for w in wins:
        if out and len(out[-1]) < batch_size and out[-1][0].end - out[-1][0].start == w.end - w.start:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def resolve_layers(spec: list[str], n_layers: int) -> list[int]:
    """"middle" -> n_layers // 2, "last" -> n_layers (HF output_hidden_states numbering), "eagle3" -> the three
    layers an EAGLE-3 head fuses (2, n/2, n-3), or integers."""
    layers = []
    for s in spec:
        if s == "eagle3":
            layers += eagle3_layers(n_layers)
            continue
        layer = {"middle": n_layers // 2, "last": n_layers}.get(s)
        if layer is None:
            if not s.lstrip("-").isdigit() or not 0 <= int(s) <= n_layers:
                raise ValueError(f"layer {s!r}: use middle, last, eagle3 or an integer 0..{n_layers} (0 = embeddings)")
            layer = int(s)
        layers.append(layer)
    return sorted(set(layers))


def describe_models(lms: list[Opened], layers) -> list[dict]:
    """meta["models"]: ModelInfo (without the cache path) + the shard folder and the recorded layers."""
    # without the cache path, and without context_length: settings.json stays as before it existed (resumable)
    return [{**{k: v for k, v in lm.info.to_dict().items() if k not in ("path", "context_length")}, "dir": f"m{i}",
             "layers": resolve_layers(list(layers), lm.info.n_layers)} for i, lm in enumerate(lms)]


def logit_stats(logits: torch.Tensor, targets: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """Per-row statistics of next-token logits [n, V] in float32, with one exp pass. Logits are shifted by the row
    max, so the entropy of a sure prediction does not cancel out."""
    lg = logits.float()
    top_l, top_i = lg.topk(topk, -1)
    shifted = lg - top_l[:, :1]
    e = shifted.exp()
    z = e.sum(-1)
    entropy = z.log() - torch.linalg.vecdot(e, shifted) / z
    top_p = (top_l - top_l[:, :1]).exp() / z[:, None]
    # argmax, not top_i[:, 0]: the first maximal id, as greedy decoding picks (topk orders ties arbitrarily)
    return {"argmax": logits.argmax(-1).int(), "p_target": shifted.gather(1, targets[:, None])[:, 0].exp() / z,
            "p_max": top_p[:, 0], "entropy": entropy, "entropy_norm": entropy / math.log(logits.shape[-1]),
            "topk_ids": top_i.int(), "topk_p": top_p}


@torch.inference_mode()
def record_windows(lms: list[Opened], meta_models: list[dict], ids: torch.Tensor, wins: list[Window],
                   topk: int, batch_size: int, hidden_dtype: str) -> dict[str, np.ndarray]:
    """All fields for the positions recorded by `wins`, keyed by their file inside a shard."""
    cols: dict[str, list[torch.Tensor]] = {}

    def put(key, value):
        cols.setdefault(key, []).append(value.cpu())

    for batch in batches(wins, batch_size):
        keep = max(w.end - w.first for w in batch)
        x = torch.stack([ids[w.start:w.end] for w in batch])
        pos = torch.cat([torch.arange(w.first, w.end) for w in batch])
        for key, value in (("token", ids[pos]), ("target", ids[pos + 1]), ("pos", pos)):
            put(field_file(key), value.to(torch.int32))
        for lm, m in zip(lms, meta_models):
            out_logits, out_hidden = lm.backend.score_windows(x, keep, m["layers"])
            for i, w in enumerate(batch):  # views of each window's rows, in chunks: no copy of the whole logits
                rows, targets = out_logits[i, keep - (w.end - w.first):], ids[w.first + 1:w.end + 1]
                for lg, tg in zip(rows.split(STATS_ROWS), targets.to(rows.device).split(STATS_ROWS)):
                    for field, value in logit_stats(lg, tg, topk).items():
                        put(field_file(field, m["dir"]), value)
            for layer in m["layers"]:
                h = torch.cat([out_hidden[layer][i, w.first - w.start:] for i, w in enumerate(batch)])
                if hidden_dtype == "int8":  # symmetric per-row scale: ~3% relative error, half the bytes
                    scale = h.float().abs().amax(-1).clamp_min(1e-12) / 127
                    put(field_file(f"hidden/{layer}", m["dir"]), (h.float() / scale[:, None]).round().to(torch.int8))
                    put(field_file(f"hidden/{layer}/scale", m["dir"]), scale)
                else:
                    h16 = h.to(torch.float16)
                    if not torch.isfinite(h16).all():  # e.g. massive activations of big models
                        raise RecordsError(f"{m['name']}: layer {layer} has values beyond the float16 range; "
                                           "record with --hidden-dtype int8")
                    put(field_file(f"hidden/{layer}", m["dir"]), h16)
    return {k: torch.cat(v).numpy() for k, v in cols.items()}


def write_shard(final: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write all arrays of a shard plus shard.json (sha256 per file) into a temp folder, then rename it."""
    with atomic_dir(final) as tmp:
        files = {}
        for rel, a in arrays.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp / rel, a)
            files[rel] = sha256_file(tmp / rel)
        (tmp / "shard.json").write_text(json.dumps({"n": len(arrays["token.npy"]), "files": files}, indent=1))


def book_done(book_dir: Path) -> bool:
    f = book_dir / "book.json"
    return f.is_file() and all((book_dir / f"{c:05d}").is_dir() for c in range(json.loads(f.read_text())["shards"]))


def record_book(lms, meta_models, text: str, book_dir: Path, cfg: dict, process: int = 0, bar=None) -> dict:
    """Record one book's missing shards into book_dir, then write book.json (returned)."""
    ids = torch.tensor(encode_text(lms[0].tokenizer, text), dtype=torch.long)
    n_pos = max(0, len(ids) - 1)
    if cfg["max_tokens_per_book"]:
        n_pos = min(n_pos, cfg["max_tokens_per_book"])
    wins = windows(n_pos, cfg["context"], cfg["stride"])
    per_shard = max(1, cfg["shard_tokens"] // cfg["stride"])
    chunks = [wins[i:i + per_shard] for i in range(0, len(wins), per_shard)]
    book_dir.mkdir(parents=True, exist_ok=True)
    for stale in book_dir.glob(".*.tmp"):  # left by a killed run (the folder lock keeps live writers out)
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    if bar is not None:
        bar.total = (bar.total or 0) + n_pos
        bar.refresh()
    for c, chunk in enumerate(chunks):
        final = book_dir / f"{c:05d}"
        if not final.is_dir():
            write_shard(final, record_windows(lms, meta_models, ids, chunk, cfg["topk"], cfg["batch_size"],
                                              cfg["hidden_dtype"]))
        if bar is not None:
            bar.update(chunk[-1].end - chunk[0].first)
    info = {"tokens": len(ids), "positions": n_pos, "shards": len(chunks), "process": process}
    write_json(book_dir / "book.json", info)
    return info


def assign(items: list[tuple[str, dict]], rank: int, world: int) -> list[tuple[str, dict]]:
    """This process's share of (split, book) items: longest first to the least loaded process (deterministic)."""
    work = [0] * world
    mine = []
    for split, book in sorted(items, key=lambda it: (-it[1]["chars"], it[1]["book_id"])):
        r = min(range(world), key=lambda i: (work[i], i))
        work[r] += book["chars"]
        if r == rank:
            mine.append((split, book))
    order = {(s, b["book_id"]): i for i, (s, b) in enumerate(items)}
    return sorted(mine, key=lambda it: order[(it[0], it[1]["book_id"])])


def collect_manifest(out: Path, settings: dict, extra: dict, books: dict[str, list[str]]) -> dict:
    shards, positions = {}, {}
    for split, ids in books.items():
        shards[split], positions[split] = [], 0
        for book_id in ids:
            book_dir = out / split / book_id
            if not book_done(book_dir):
                raise RecordsError(f"{book_dir}: book not (completely) recorded; re-run the same command")
            info = json.loads((book_dir / "book.json").read_text())
            positions[split] += info["positions"]
            for c in range(info["shards"]):
                shard = json.loads((book_dir / f"{c:05d}" / "shard.json").read_text())
                shards[split].append({"book": book_id, "path": f"{split}/{book_id}/{c:05d}", **shard})
    return {**settings, **extra, "books": books, "positions": positions, "shards": shards}


def record(model_names: list[str], corpus: str | Path, out: str | Path, *, layers=("middle", "last"),
           context: int = 1024, stride: int = 768, topk: int = 8, batch_size: int = 1, splits=None,
           max_tokens_per_book: int | None = None, shard_tokens: int = 16384, hidden_dtype: str = "float16",
           dtype: str = "float32", progress: bool = True, backend: str = "hf") -> dict:
    """Record `model_names` over `corpus` into `out` (see the module docstring); returns the manifest.
    backend "llama.cpp": the GGUF models in llama.cpp (inner layers where its graph marks them)."""
    from accelerate import PartialState

    if not 0 < stride <= context:
        raise ValueError(f"need 0 < stride <= context, got context={context} stride={stride}")
    if len(set(model_names)) != len(model_names):
        raise ValueError(f"a model is named twice: {model_names}")
    corpus, out = Path(corpus), Path(check_output_dir(out, "--out"))
    entries = load_manifest(corpus)
    splits = list(splits or [s for s in SPLITS if any(e["split"] == s for e in entries)])
    books = {s: books_of_split(corpus, s) for s in splits}
    too_many = [s for s, b in books.items() if len(b) > np.iinfo(np.int16).max]
    if too_many:
        raise ValueError(f"split(s) {too_many} hold more books than the int16 'book' field can index")

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with this
    # A long barrier timeout: the main process may wait for the others' books for hours.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    with contextlib.ExitStack() as held:
        if state.is_main_process:  # one lock per run: the other processes of the run write under it
            held.enter_context(FolderLock(out, "train.py record"))
        lms = [open_backend(n, backend, dtype, str(state.device)) for n in model_names]
        fingerprint = check_same_tokenizer({lm.info.name: lm.info.fingerprint for lm in lms})  # before any work
        for lm in lms:
            check_context(context, lm.info, f"--context {context}")
        meta_models = describe_models(lms, layers)
        for lm, m in zip(lms, meta_models):   # a runtime that cannot give these layers says so before any work
            if m["layers"]:
                saved = lm.backend.hidden_layer
                lm.backend.hidden_layer = tuple(m["layers"])
                lm.backend.hidden_layer = saved
        settings = {"format": FORMAT, "models": meta_models, "fingerprint": fingerprint,
                    "tokenization": {"tokenizer_of": model_names[0], "add_special_tokens": True},
                    "context": context, "stride": stride, "topk": topk, "batch_size": batch_size,
                    "shard_tokens": shard_tokens, "hidden_dtype": hidden_dtype, "splits": splits,
                    "max_tokens_per_book": max_tokens_per_book, "corpus_sha256": sha256_file(corpus / "manifest.jsonl"),
                    "device": state.device.type, **({"backend": backend} if backend != "hf" else {})}
        pinned = out / "settings.json"
        if pinned.is_file():
            old = json.loads(pinned.read_text())
            diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)]
            if diff:
                raise RecordsError(f"{out} holds records made with other settings ({'; '.join(diff)}); use another "
                                   "--out, or delete the folder to record again")
        elif state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_json(pinned, settings)
        state.wait_for_everyone()

        items = [(s, b) for s in splits for b in books[s]]
        mine = assign(items, state.process_index, state.num_processes)
        bar = tqdm(unit="tok", unit_scale=True, desc="record",
                   disable=not (progress and state.is_local_main_process))
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            for split, book in mine:
                book_dir = out / split / book["book_id"]
                if not book_done(book_dir):
                    bar.set_postfix_str(book["book_id"])
                    record_book(lms, meta_models, read_book(corpus, book["book_id"]), book_dir, settings,
                                state.process_index, bar)
        finally:
            torch.use_deterministic_algorithms(prev)
            bar.close()
        state.wait_for_everyone()
        manifest = collect_manifest(out, settings, {"corpus": str(corpus.resolve()), "versions": {
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}},
            {s: [b["book_id"] for b in books[s]] for s in splits})
        if state.is_main_process:
            write_json(out / "manifest.json", manifest)
        state.wait_for_everyone()
        return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train.py record", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="model name (alias, hub id, local dir, .gguf); repeat for models sharing a tokenizer")
    ap.add_argument("--corpus", required=True, help="corpus folder (train.py corpus)")
    ap.add_argument("--out", required=True, help="records folder to create or resume")
    ap.add_argument("--layers", nargs="*", default=["middle", "last"],
                    help="hidden states to store: middle, last, eagle3 (the three an EAGLE-3 head fuses: 2, n/2, "
                    "n-3) or numbers (HF numbering, 0 = embeddings); "
                         "none if given without values")
    ap.add_argument("--context", type=int, default=1024, help="window length in tokens")
    ap.add_argument("--stride", type=int, default=768,
                    help="window step; every position sees >= context - stride tokens before it")
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, help="default: every split that has books")
    ap.add_argument("--max-tokens-per-book", type=int, help="record only the first N positions of each book")
    ap.add_argument("--shard-tokens", type=int, default=16384, help="about this many positions per shard")
    ap.add_argument("--hidden-dtype", choices=HIDDEN_DTYPES, default="float16",
                    help="int8 (per-row scale) halves the hidden-state bytes; read back as float16")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="model weights dtype: the one you will decode with (see above for speed)")
    ap.add_argument("--backend", choices=tuple(BACKENDS), default="hf",
                    help="model runtime: transformers (any layer), or llama.cpp for GGUF models (any layer on llama-"
                         "architecture models such as SmolLM2, the last only on others; --dtype does not apply)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        m = record(args.model, args.corpus, args.out, layers=args.layers, context=args.context, stride=args.stride,
                   topk=args.topk, batch_size=args.batch_size, splits=args.splits,
                   max_tokens_per_book=args.max_tokens_per_book, shard_tokens=args.shard_tokens,
                   hidden_dtype=args.hidden_dtype, dtype=args.dtype, progress=not args.no_progress,
                   backend=args.backend)
    except (ProjectError, ValueError) as e:
        print(f"train.py record: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"recorded {sum(m['positions'].values())} positions "
          f"({', '.join(f'{s}: {n}' for s, n in m['positions'].items())}) into {args.out}")
    return 0
