"""Shared test helpers (not a test module): tiny random models and tokenizers, saved model folders, corpus
folders in the documented format, tiny records, the tiny-decode helpers and a lock held by another process.

conftest.py turns the common ones into fixtures; test modules import the rest from here, never from each other.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corpus_tools import record as rec_mod
from gate.decode.loop import Decoder
from gate.decode.policies import BigOnly
from gate.model.base import Drafter
from runtimes.hf import HFBackend

ROOT = Path(__file__).resolve().parents[1]

# -- tiny models ---------------------------------------------------------------------------------------------
TINY_TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "\u201cMy dear Mr. Bennet,\u201d said his lady to him one day, \u201chave you heard that "
    "Netherfield Park is let at last?\u201d",
    "Mr. Bennet replied that he had not. \u201cBut it is,\u201d returned she; \u201cfor Mrs. Long "
    "has just been here, and she told me all about it.\u201d",
]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on a few sentences: a real tokenizer, different from SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A randomly initialised LLaMA small enough to run hundreds of decode steps in a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_model(path: Path, model, tokenizer) -> str:
    """A local HF model folder (weights + tokenizer), as `--model DIR` reads it."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A tiny random LLaMA (context length 2,048) with its own tiny tokenizer, saved as a local HF folder."""
    tok = make_tiny_tokenizer()
    save_model(path, make_tiny_llama(len(tok), seed=seed), tok)
    return Path(path)


# -- corpora and records -------------------------------------------------------------------------------------
TINY = dict(context=64, stride=48, batch_size=2, shard_tokens=200, dtype="float32", progress=False)


def write_corpus(path: Path, books: list[tuple[str, str, str]]) -> Path:
    """A corpus folder in the documented format (docs/interfaces.md): (book_id, split, text) per book."""
    (path / "text").mkdir(parents=True)
    rows = []
    for book_id, split, text in books:
        (path / "text" / f"{book_id}.txt").write_text(text, encoding="utf-8")
        rows.append({"book_id": book_id, "title": book_id, "source": f"{book_id}.epub",
                     "sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text),
                     "words": len(text.split()), "paragraphs": text.count("\n\n") + 1, "split": split})
    (path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def book_text(i: int, repeat: int) -> str:
    return "\n\n".join((TINY_TEXT[i % 4:] + TINY_TEXT[:i % 4]) * repeat)


def paragraph_corpus(path: Path, splits: list[str], paragraphs) -> Path:
    """A corpus of one book per split, book i being a title paragraph and then paragraphs(i)."""
    return write_corpus(path, [(f"b{i}", split, "\n\n".join([f"Title {i}", *paragraphs(i)]))
                               for i, split in enumerate(splits)])


SPLIT_REC = dict(context=64, stride=48, batch_size=2, shard_tokens=400, dtype="float32", progress=False)


def split_records(root: Path, model, tokenizer, layers: tuple[str, ...]) -> tuple[str, Path, Path]:
    """(model dir, corpus, records) of a tiny model over four small books in train / train / val / test."""
    model_dir = save_model(root / "tiny", model, tokenizer)
    corpus = write_corpus(root / "corpus", [("a", "train", book_text(0, 6)), ("b", "train", book_text(1, 6)),
                                            ("c", "val", book_text(2, 5)), ("d", "test", book_text(3, 4))])
    rec_mod.record([model_dir], corpus, root / "records", layers=layers, **SPLIT_REC)
    return model_dir, corpus, root / "records"


# -- tiny decoding -------------------------------------------------------------------------------------------
PROMPTS = ["It is a truth", "My dear Mr. Bennet", "However little known", "Netherfield Park is let",
           "she told me all about it", "a single man in possession"]


def lively(model, seed: int):
    """A copy of a tiny random model whose blocks write strongly into the residual stream, so its greedy
    output depends on the context (default-initialised tiny models repeat one token)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.model.layers:
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                w.normal_(0, 1, generator=g)
            for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight):
                w.normal_(0, 0.5, generator=g)
        # logits with std ~3: normalised entropies spread over ~0.1..0.7 (default init: all ~0.97)
        m.lm_head.weight.normal_(0, 3 / m.lm_head.weight.shape[1] ** 0.5, generator=g)
    return m


class FnDrafter(Drafter):
    """A Drafter (docs/interfaces.md) from a function (ids, hidden, since_big) -> (token, score)."""

    def __init__(self, fn, threshold=0.5, max_skip=8, hidden_layer=None):
        self.fn, self.threshold, self.max_skip, self.hidden_layer = fn, threshold, max_skip, hidden_layer
        self.seen = []

    def propose(self, ids, hidden, since_big):
        self.seen.append((list(ids), None if hidden is None else hidden.clone(), since_big))
        return self.fn(list(ids), hidden, since_big)


def ledger_adds_up(res, big: HFBackend):
    led = res.ledger
    n = len(res.ids)
    assert led["new_tokens"] == n == len(res.sources)
    assert sum(led["by_source"].values()) == n
    assert led["big_emitted"] + led["skipped"] == n
    assert led["drafted"] == led["skipped"] + led["rolled_back_tokens"]
    assert led["big_tokens_fed"] == big.n_cached + led["big_tokens_cropped"]
    assert big.n_cached <= led["prompt_tokens"] + n
    # one big pass per big token, plus at most one final pass that only checks the tail
    assert led["big_calls"] <= led["big_emitted"] + (1 if led["verify"] else 0)
    for m in led["models"].values():
        assert m["tokens_fed"] == m["n_cached"] + m["tokens_cropped"]
    if not led["verify"]:
        assert led["rollbacks"] == led["verified"] == 0


def greedy(big_model, ids, n, eos=()):
    return Decoder(HFBackend(big_model, "big"), BigOnly(), eos_ids=eos).generate(ids, n).ids


# -- locks ---------------------------------------------------------------------------------------------------
HOLD = ("import sys, time; from common.files import FolderLock; "
        "FolderLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); time.sleep(120)")


def hold_lock(folder: Path, what: str = "train.py record") -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), what], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays behind, naming a dead pid
    p.wait()
    p.stdout.close()


# -- entry points run in this process ------------------------------------------------------------------------
def call_main(main, argv: list) -> tuple[int, str]:
    """An entry point's main(argv) in this process, as a user's run would end: (exit status, stderr). An argparse
    error is its SystemExit status; any other exception propagates (a bug keeps its traceback). The thread count
    and random state a command sets are put back. A fresh `python train.py ...` per case costs seconds (torch and
    transformers imported anew), this milliseconds; the entry scripts themselves keep a few true subprocess cases
    (test_cli_errors.py, test_infer_cli.py)."""
    err, threads = io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stderr(err), torch.random.fork_rng():
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    torch.set_num_threads(threads)
    return (0 if rc is None else rc), err.getvalue()


def assert_one_error_line(rc: int, err: str, expected: str, start: str = "") -> None:
    """A user's mistake: exit 2, no traceback, exactly one `error:` line, the last, starting with `start` (the
    program's name) and holding `expected`."""
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-2000:]
    assert errors[0].startswith(start), (start, errors[0])
    assert expected in errors[0], (expected, errors[0])


@contextlib.contextmanager
def unwritable(path: Path):
    """`path` made unwritable for this process while the block runs: immutable (chattr +i) as root, read-only
    otherwise; skips the test where neither is possible."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here (root writes any read-only file)")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield path
        finally:
            path.chmod(mode)
