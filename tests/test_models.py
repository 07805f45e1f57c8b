"""Model sources: the real packaged SmolLM2 and the GGUF conversion cache."""
import pytest
import torch

from runtimes import info, loading, sources

from helpers import make_tiny_tokenizer

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good"


def test_smollm2_loads_with_finite_logits(smollm2):
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = smollm2.model(ids).logits
    assert logits.shape == (1, ids.shape[1], smollm2.info.vocab_size)
    assert torch.isfinite(logits.float()).all()
    info = smollm2.info
    assert (info.n_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
    assert 130e6 < info.n_params < 140e6


def test_greedy_is_deterministic_and_sensible(smollm2):
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    outs = [smollm2.model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
            for _ in range(2)]
    assert outs[0] == outs[1]


def test_real_weights_predict_real_text(smollm2):
    """Random weights give ~log|V| = 10.8 nats/token; the real model must do far better on prose."""
    ids = smollm2.tokenizer(PROMPT + " fortune, must be in want of a wife.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = smollm2.model(ids, labels=ids).loss.item()
    assert loss < 5.0


def test_cached_reload_gives_same_logits(smollm2):
    again = loading.load("smollm2-135m")
    assert again.info.path == smollm2.info.path  # the same cached conversion, not a new one
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = smollm2.model(ids).logits, again.model(ids).logits
    assert torch.equal(a, b)


def test_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    """A crash mid-conversion leaves no cache entry; the next call converts and the one after reuses."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
    paths = sources.packaged_gguf("smollm2-135m")
    import transformers
    real_save = transformers.PreTrainedModel.save_pretrained

    def crash(self, *a, **k):
        real_save(self, *a, **k)
        raise KeyboardInterrupt("simulated kill after writing weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        sources.convert_gguf(paths, "smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []  # no half-written entry, temp dir removed
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real_save)
    dst = sources.convert_gguf(paths, "smollm2-135m")
    assert (dst / "model.safetensors").exists()
    mtime = (dst / "model.safetensors").stat().st_mtime_ns
    assert sources.convert_gguf(paths, "smollm2-135m") == dst
    assert (dst / "model.safetensors").stat().st_mtime_ns == mtime


def test_fingerprint_distinguishes_tokenizers(smollm2):
    tiny = make_tiny_tokenizer()
    fp_smol = smollm2.info.fingerprint
    assert fp_smol == info.tokenizer_fingerprint(smollm2.tokenizer)
    assert fp_smol != info.tokenizer_fingerprint(tiny)
    with pytest.raises(info.TokenizerMismatch, match="do not share a tokenizer"):
        info.check_same_tokenizer({"smollm2": fp_smol, "tiny": info.tokenizer_fingerprint(tiny)})
    assert info.check_same_tokenizer({"a": fp_smol, "b": fp_smol}) == fp_smol


def test_bad_model_names_are_explained(tmp_path):
    with pytest.raises(info.ModelSourceError, match="does not exist"):
        sources.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(info.ModelSourceError, match="no config.json"):
        sources.resolve(str(tmp_path))
    with pytest.raises(info.ModelSourceError, match="unknown model"):
        sources.resolve("no-such-alias")


def test_a_file_that_is_not_gguf_is_named(tmp_path, monkeypatch):
    """Issue 13 case 8: 100 random bytes named .gguf gave a ValueError traceback about magic bytes."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(bytes(range(100)))
    with pytest.raises(info.ModelSourceError, match=f"{fake}: not a GGUF file"):
        loading.load(str(fake))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + bytes(96))  # right magic, nothing readable after it
    with pytest.raises(info.ModelSourceError, match=f"{truncated}: cannot read this GGUF file"):
        loading.load(str(truncated))
    assert not list((tmp_path / "cache" / "models").iterdir())  # no cache entry, no temp folder left


def test_context_length_is_known_and_checked(smollm2):
    """One check, with the numbers, for every path that feeds a model."""
    mi = smollm2.info
    assert mi.context_length == 8192 == info.context_length_of(smollm2.model.config)
    for same in (mi, mi.to_dict(), smollm2, smollm2.model, smollm2.model.config):
        assert info.context_length_of(same) == 8192
        info.check_context(8192, same, "prompt")
    with pytest.raises(info.ContextLengthError,
                       match=r"^prompt \(8,555 tokens\) \+ -m 64: 8,619 tokens, more than the 8,192 tokens "
                             r"'smollm2-135m' reads at once"):
        info.check_context(8619, mi, "prompt (8,555 tokens) + -m 64")
    info.check_context(10**6, {"name": "x"}, "prompt")  # a model that does not say: not checked
    assert isinstance(info.ContextLengthError("x"), ValueError)


def test_gguf_parts_are_joined_once_into_the_cache(tmp_path, monkeypatch):
    """A model shipped as GGUF parts (the Qwen packages) is one file for llama.cpp and transformers: the parts
    concatenated in order, once (a second call reuses the cached file)."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    src = sources.packaged_gguf("smollm2-135m")[0].read_bytes()[:3_000_000]
    parts = []
    for i, k in enumerate(range(0, len(src), 1_000_000)):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(src[k:k + 1_000_000])
    joined = sources.joined_gguf(parts, "demo-model")
    assert joined.read_bytes() == src and joined.parent == tmp_path / "cache" / "gguf"
    mtime = joined.stat().st_mtime_ns
    assert sources.joined_gguf(parts, "demo-model") == joined and joined.stat().st_mtime_ns == mtime
    assert sources.joined_gguf(parts[:1], "demo-model") == parts[0]      # one file is used as it is
    assert not list((tmp_path / "cache" / "gguf").glob("*.tmp*"))


def test_a_truncated_gguf_is_one_error_line(tmp_path):
    """Issue 22, case 12: a .gguf cut short (in its metadata, in its tensors) on the transformers backend (the
    conversion to safetensors) is one `error:` line, as on llama.cpp, not a struct traceback; the cache is left
    without a half conversion."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    try:
        src = sources.ALIASES["smollm2-135m"].gguf_paths()[0]
    except (ModuleNotFoundError, ImportError):
        pytest.skip("the packaged SmolLM2 is not installed")
    data = src.read_bytes()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SKIPGATE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for n, cmd in ((300_000, ["train.py", "models"]),
                   (len(data) // 2, ["infer.py", "Hi", "-m", "2", "--backend", "hf", "--model"])):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        r = subprocess.run([sys.executable, *cmd, str(cut)], cwd=root, capture_output=True, text=True, timeout=300,
                           env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        errors = [line for line in r.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"{cut}: cannot read this GGUF file" in errors[0], r.stderr[-2000:]
        assert not [p for p in (tmp_path / "cache" / "models").glob("*") if p.is_dir()]   # no half conversion
