"""`python train.py export --gate DIR --format eagle3 --out OUT`: a trained feature head (train.py fit --drafter
eagle) as the Hugging Face EAGLE-3 draft folder that vLLM, SGLang and llama.cpp serve with.

OUT/config.json and OUT/model.safetensors (gate/model/export.py: the mapping and the layer numbering), and
OUT/draft.gguf converted by llama.cpp's own convert_hf_to_gguf.py from the pinned llama-cpp-python source
(runtimes/llama_tools.py; fetched once into the cache) with the target's Hugging Face folder as --target-model-dir
(a GGUF target is converted into the cache once, runtimes/sources.py `resolve`). The folder is built under a
temporary name beside OUT and renamed into place, so a killed export leaves no half folder.

Refused before anything is written, with one `error:` line: a drafter that is not an EAGLE-3-shaped feature head
(a heads drafter, a router, an old skipgate-eagle/1 head, a head over other than three inner layers), a target
that is not the drafter's (tokenizer, width, vocabulary, layers), a target llama.cpp's draft-eagle3 cannot hook
(unless --no-gguf), an --out that exists and is not empty (unless --force) or that holds the drafter itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from common.errors import UsageError
from common.files import check_output_dir, real_path, save_tensors, write_json
from gate.model.artifact import META_FILE, artifact_digest
from gate.model.eagle import EAGLE_FORMAT
from gate.model.export import (
    LLAMACPP_EAGLE3_TARGETS,
    ExportError,
    check_exportable,
    eagle3_config,
    eagle3_tensors,
)
from gate.model.load import kind_of, load_drafter, read_meta
from runtimes.info import ModelSourceError, TokenizerMismatch, tokenizer_fingerprint
from runtimes.llama_tools import convert_hf_to_gguf, llama_cpp_source
from runtimes.loading import load_tokenizer
from runtimes.sources import resolve

FORMATS = ("eagle3",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

EPILOG = """examples:
  python train.py export --gate runs/eagle3/gate --format eagle3 --out runs/eagle3/export
  python train.py export --gate G --out OUT --target path/to/hf_folder --gguf-type f16
serve it (TARGET: the model the head was trained on):
  vllm serve TARGET --speculative-config '{"method": "eagle3", "model": "OUT", "num_speculative_tokens": 3}'
  python -m sglang.launch_server --model-path TARGET --speculative-algorithm EAGLE3 \\
      --speculative-draft-model-path OUT --speculative-num-steps 3 --speculative-eagle-topk 1 \\
      --speculative-num-draft-tokens 4
  llama-server -m TARGET.gguf -md OUT/draft.gguf --spec-type draft-eagle3 --spec-draft-n-max 3
(docs/drafters.md, "Exporting the feature head")"""


def feature_head_of(gate: Path):
    """(EagleDrafter, drafter.json) of an EAGLE-3-shaped feature head at `gate`; ExportError naming what else it is."""
    mf = gate / META_FILE
    try:
        fmt = json.loads(mf.read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None                       # read_meta names the problem
    if isinstance(fmt, str) and fmt.startswith("skipgate-eagle/") and fmt != EAGLE_FORMAT:
        raise ExportError(f"--gate {gate}: format {fmt!r}, the feature head before EAGLE-3's layout (one layer over "
                          f"one hidden state); retrain it with `train.py fit --drafter eagle` ({EAGLE_FORMAT})")
    meta = read_meta(gate)
    if meta["format"] != EAGLE_FORMAT:
        raise ExportError(f"--gate {gate}: {kind_of(meta)}, not a feature head; --format eagle3 exports the "
                          "feature head of `train.py fit --drafter eagle`")
    return load_drafter(gate, None), meta


def target_folder(name: str) -> Path:
    """The target's Hugging Face folder (config.json + tokenizer): a local folder, an alias or .gguf file converted
    once into the cache, or a hub id already in the local Hugging Face cache."""
    src = resolve(name)
    if isinstance(src, Path):
        return src
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src), local_files_only=True))
    except Exception as e:   # noqa: BLE001 - any failure: not in the local cache
        raise ModelSourceError(f"--target {name}: a hub id not in the local Hugging Face cache ({type(e).__name__});"
                               " name a local folder, a .gguf file or an alias") from None


def target_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{folder / 'config.json'}: cannot read the target's config ({e})") from None
    return {**cfg, **cfg.get("text_config", {})}


def check_target(name: str, folder: Path, cfg: dict, meta: dict) -> None:
    """The target must be the model the head was trained on: its tokenizer and its depth (width and vocabulary:
    eagle3_config; the layers the head reads: check_exportable)."""
    want = meta["big_model"].get("fingerprint")
    try:
        have = tokenizer_fingerprint(load_tokenizer(str(folder)))
    except ModelSourceError:
        have = None
    if want and have and want != have:
        raise TokenizerMismatch(f"--target {name}: tokenizer {have}, but the feature head was trained for "
                                f"{meta['big_model'].get('name')!r} (tokenizer {want})")
    if "num_hidden_layers" not in cfg:
        raise ModelSourceError(f"{folder / 'config.json'}: no num_hidden_layers")
    trained = meta["big_model"].get("n_layers")
    if trained is not None and int(trained) != int(cfg["num_hidden_layers"]):
        raise ExportError(f"--target {name}: {cfg['num_hidden_layers']} blocks, but the feature head was trained on "
                          f"{meta['big_model'].get('name')!r} with {trained}")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out` (an existing one, --force, is moved aside first, then removed)."""
    if out.exists() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_eagle3(gate: str | Path, out: str | Path, target: str | None = None, dtype: str = "float32",
                  gguf_type: str | None = "f32", force: bool = False, log=print) -> Path:
    """Write the EAGLE-3 folder of the feature head at `gate` to `out` (see the module docstring); gguf_type None:
    no draft.gguf. Returns the folder."""
    gate, shown = Path(gate), Path(out)
    check_output_dir(shown, "--out")
    out = real_path(shown)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {shown}: exists and is not empty; name a new folder, or --force to replace it")
    if gate.is_dir() and (out == real_path(gate) or real_path(gate).is_relative_to(out)):
        raise UsageError(f"--out {shown}: holds the drafter --gate {gate}; name another folder")
    drafter, meta = feature_head_of(gate)
    head = drafter.head
    check_exportable(head)
    name = target or meta["big_model"]["name"]
    folder = target_folder(name)
    cfg = target_config(folder)
    if gguf_type is not None and cfg.get("model_type") not in LLAMACPP_EAGLE3_TARGETS:
        raise ExportError(f"the target {name!r} is a {cfg.get('model_type')!r} model; llama.cpp's draft-eagle3 reads "
                          f"block inputs only from {', '.join(sorted(set(LLAMACPP_EAGLE3_TARGETS.values())))} targets "
                          "in this llama.cpp; --no-gguf writes the folder for vLLM and SGLang without draft.gguf")
    check_target(name, folder, cfg, meta)
    check_exportable(head, int(cfg["num_hidden_layers"]))
    extra = {"exported_by": "skipgate train.py export", "drafter": str(real_path(gate)),
             "drafter_digest": artifact_digest(gate), "drafter_format": meta["format"],
             "target": name, "target_fingerprint": meta["big_model"].get("fingerprint"),
             "layer_numbering": "eagle_aux_hidden_state_layer_ids: inputs of these target blocks (vLLM, llama.cpp); "
                                "eagle_config's list: the same minus one (SGLang adds one)"}
    config = eagle3_config(head, cfg, dtype, extra)
    if gguf_type is not None:
        llama_cpp_source()     # fetched and unpacked once, before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        save_tensors(eagle3_tensors(head, DTYPES[dtype]), tmp / "model.safetensors")
        write_json(tmp / "config.json", config)
        if gguf_type is not None:
            log(f"[export] converting with llama.cpp's convert_hf_to_gguf.py (--outtype {gguf_type}, target {folder})")
            convert_hf_to_gguf(tmp, tmp / "draft.gguf", gguf_type, target_dir=folder,
                               what=f"the draft for {name} (tokenizer and sizes from {folder}; --no-gguf skips this)")
        os.chmod(tmp, 0o777 & ~umask())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return shown


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="train.py export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Export a trained feature head (train.py fit --drafter eagle) as the Hugging Face EAGLE-3 draft "
                    "folder vLLM, SGLang and llama.cpp serve with: config.json, model.safetensors and draft.gguf "
                    "(converted by llama.cpp's own converter from the pinned llama-cpp-python source, fetched once "
                    "into $SKIPGATE_CACHE/llama.cpp-src).")
    ap.add_argument("--gate", required=True, help="the feature-head drafter folder (format skipgate-eagle/2)")
    ap.add_argument("--format", choices=FORMATS, default="eagle3", help="what to export as (default: eagle3)")
    ap.add_argument("--out", required=True, help="the folder to write (new or empty; --force replaces one)")
    ap.add_argument("--target", help="the target model, if not the one in the drafter's drafter.json: an alias, a "
                                     "Hugging Face folder, a .gguf file or a hub id in the local cache")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="dtype of model.safetensors (default: float32, the head as trained)")
    ap.add_argument("--gguf-type", choices=GGUF_TYPES, default="f32",
                    help="--outtype for llama.cpp's converter (default: f32)")
    ap.add_argument("--no-gguf", action="store_true",
                    help="write config.json and model.safetensors only (vLLM, SGLang; any target architecture)")
    ap.add_argument("--force", action="store_true", help="replace an --out that is not empty")
    args = ap.parse_args(argv)
    out = export_eagle3(args.gate, args.out, args.target, args.dtype, None if args.no_gguf else args.gguf_type,
                        args.force, log=lambda m: print(m, file=sys.stderr))
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    print("serve it with the target it was trained on (train.py export --help: vLLM, SGLang, llama.cpp), e.g.")
    print(f"  vllm serve TARGET --speculative-config '{{\"method\": \"eagle3\", \"model\": \"{out}\", "
          f"\"num_speculative_tokens\": 3}}'")
    if not args.no_gguf:
        print(f"  llama-server -m TARGET.gguf -md {Path(out) / 'draft.gguf'} --spec-type draft-eagle3")
    return 0


__all__ = ["export_eagle3", "feature_head_of", "main"]
