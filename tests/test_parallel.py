"""infer.py --parallel: prompts decoded side by side in one llama.cpp context give the one-at-a-time outputs.

The scheduler is tested on a fake context (no model: rows are a function of sequence, position and token); the
end-to-end cases run the real SmolLM2 GGUF on llama.cpp.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from gate.decode.parallel import choose_parallel, slot_profile
from runtimes.batched import Scheduler, SlotBackend

ROOT = Path(__file__).resolve().parents[1]
V = 7


class FakeSlots:
    """A LlamaCppSlots stand-in: the logits row of a token is one-hot at (seq + pos + token) % V, the hidden row
    [seq, pos, token]; it records every pass."""
    name, vocab_size, n_layers, hidden_size, path, n_threads, device = "fake", V, 2, 3, None, 1, "cpu"

    def __init__(self, n: int, ctx: int = 1000):
        self.slot_ctx, self.hidden_layer, self.passes = ctx, None, []
        self.slots = [SlotBackend(self, i) for i in range(n)]
        self.cache: dict[int, list[int]] = {i: [] for i in range(n)}

    def decode(self, parts):
        self.passes.append([(seq, len(t), keep) for seq, t, keep in parts])
        self.out = []
        spans = []
        for seq, tokens, keep in parts:
            for tok in tokens:
                pos = len(self.cache[seq])
                self.cache[seq].append(tok)
                self.out.append((seq, pos, tok))
            self.slots[seq].n_cached = len(self.cache[seq])
            spans.append((len(self.out) - keep, keep))
        return spans

    def rows(self, first, keep, hidden_rows=0):
        rows = self.out[first:first + keep]
        logits = torch.zeros(keep, V)
        for i, (seq, pos, tok) in enumerate(rows):
            logits[i, (seq + pos + tok) % V] = 1.0
        h = None
        if self.hidden_layer is not None:
            h = torch.tensor(self.out[first + keep - (hidden_rows or keep):first + keep], dtype=torch.float)
        return logits, h

    def remove(self, seq, n):
        del self.cache[seq][n:]
        self.slots[seq].n_cached = min(self.slots[seq].n_cached, n)

    def is_eog(self, token):
        return False


def test_scheduler_gathers_one_pass_per_round_and_chunks_prompts():
    ctx = FakeSlots(3)
    got = {}

    def job(i):
        slot = ctx.slots[i]
        logits, _ = slot.forward(list(range(10 * (i + 1))), keep=2)     # prompts of 10, 20 and 30 tokens
        got[i] = [int(logits[-1].argmax())]
        for _ in range(3):
            logits, _ = slot.forward([got[i][-1]], keep=1)
            got[i].append(int(logits[-1].argmax()))
        slot.crop(5)
        assert ctx.cache[i] == list(range(5)) and slot.n_cached == 5

    Scheduler(chunk=8).run([partial(job, i) for i in range(3)])
    # each sequence's tokens are what one sequence alone would compute: (seq + pos + token) % V
    for i in range(3):
        n, want = 10 * (i + 1), []
        tok = (i + n - 1 + n - 1) % V
        for k in range(4):
            want.append(tok)
            tok = (i + n + k + tok) % V
        assert got[i] == want
    first = ctx.passes[0]
    assert [p[1] for p in first] == [8, 8, 8]                        # chunks of 8 from every prompt at once
    assert all(len({seq for seq, _, _ in p}) == len(p) for p in ctx.passes)   # one part per sequence a pass


def test_the_last_piece_of_a_request_holds_every_row_it_keeps():
    ctx = FakeSlots(1)
    out = {}

    def job():
        out["rows"] = ctx.slots[0].forward(list(range(20)), keep=15)[0].shape[0]

    Scheduler(chunk=8).run([job])
    assert out["rows"] == 15 and [p[0][1] for p in ctx.passes] == [5, 15]   # 5, then the 15 rows it keeps


def test_hidden_rows_of_every_chunk_with_hidden_all():
    ctx = FakeSlots(1)
    ctx.hidden_layer = 2
    slot = ctx.slots[0]
    slot.hidden_all = True
    out = {}

    def job():
        out["h"] = slot.forward(list(range(20)), keep=1)[1]

    Scheduler(chunk=8).run([job])
    assert out["h"][:, 1].tolist() == list(range(20))   # positions 0..19, one row each


def test_forward_outside_a_job_and_past_the_slot_context_are_refused():
    ctx = FakeSlots(1, ctx=4)
    with pytest.raises(RuntimeError, match="inside a Scheduler job"):
        ctx.slots[0].forward([1])
    errors = []

    def job():
        try:
            ctx.slots[0].forward([1, 2, 3, 4, 5])
        except ValueError as e:
            errors.append(str(e))

    Scheduler().run([job])
    assert "more than the slot's 4 tokens of context" in errors[0]


def test_choose_parallel_and_the_slot_profile():
    curve = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.8, 16: 3.0, 32: 5.9, 64: 11.8}   # gains 1, 1.8, 3.1, 4.4, 5.3, 5.4, 5.4
    assert choose_parallel(curve, 5) == 5 and choose_parallel(curve, 1) == 1
    assert 8 <= choose_parallel({1: 1.0, 8: 2.0, 16: 4.0, 32: 16.0}, 100) <= 16   # past the top, gains fall
    # the quiet SmolLM2 curve: 64 prompts in two rounds of 32 (or 24 + 24 + 16), not one of 48 and one of 16
    smol = {1: 1.0, 2: 1.85, 4: 2.73, 8: 4.69, 16: 8.40, 24: 12.29, 32: 16.32, 48: 30.13, 64: 40.30}
    assert choose_parallel(smol, 24) == 24 and choose_parallel(smol, 64) in (22, 24, 32)
    assert choose_parallel({1: 1.0, 2: 2.0, 4: 4.0}, 10) == 1                # batching cannot pay: one at a time
    prof = slot_profile(curve, 4, 10.0, {})
    b = 1.8 / 8                       # per token of the pass over 2n = 8 sequences
    a = 1.3 - 4 * b
    assert prof.of(1) == 1.0 and prof.of(3) == pytest.approx((a / 4 + 3 * b) / (a / 4 + b), abs=1e-3)
    assert prof.step_ms == pytest.approx(10.0 * 1.3 / 4)
    # where a pass is compute-bound (cost grows in proportion to its tokens) a draft costs a whole token
    assert slot_profile(curve, 16, 10.0, {}).of(2) == pytest.approx(2.0, abs=0.02)


# -- the real model on llama.cpp -------------------------------------------------------------------------------
PROMPTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
           "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over",
           "Chapter 1\n\nEmma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
           "seemed to unite some of the best blessings of existence; and had lived nearly twenty-one years in the "
           "world with very little to distress or vex her.",
           "def fib(n):\n    if n < 2:\n        return n\n    return",
           "Once upon a time", "The capital of France is", "1, 2, 3, 4, 5,"]


def write_input(path: Path, n_new: int = 24) -> Path:
    with open(path, "w") as f:
        for i, text in enumerate(PROMPTS):
            f.write(json.dumps({"prompt": text, "max_new_tokens": n_new - 2 * i}) + "\n")   # prompts end early
        f.write(json.dumps({"prompt": "word " * 9000}) + "\n")                              # too long: an error row
    return path


def infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), "--backend", "llama.cpp", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def rows(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.real_model
@pytest.mark.parametrize("policy", [["--policy", "big"], ["--policy", "copy", "--verify"]])
def test_parallel_outputs_are_the_one_at_a_time_outputs(tmp_path, policy):
    inp = write_input(tmp_path / "in.jsonl")
    one, par = tmp_path / "one.jsonl", tmp_path / "par.jsonl"
    assert infer("--input", inp, "--output", one, "--parallel", 1, *policy).returncode == 2   # the long line
    r = infer("--input", inp, "--output", par, "--parallel", 3, *policy)
    assert r.returncode == 2, r.stderr
    a, b = rows(one), rows(par)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert "error" in b[8] and "context" in b[8]["error"]
    for k in range(1, 8):
        assert b[k]["output_ids"] == a[k]["output_ids"], k
    summary = json.loads(Path(f"{par}.summary.json").read_text())
    assert summary["last_run"]["parallel"] == 3 and summary["results"] == 7 and summary["errors"] == 1
    if "--verify" in policy:   # lossless: the big model's greedy text
        big = tmp_path / "big.jsonl"
        infer("--input", inp, "--output", big, "--parallel", 3, "--policy", "big")
        assert all(rows(big)[k]["output_ids"] == b[k]["output_ids"] for k in range(1, 8))


@pytest.mark.real_model
def test_parallel_stream_is_rows_only(tmp_path):
    """Issue 29 case 5: `--output - --parallel 2 --policy copy --verify`: stdout holds the rows and nothing else
    (the planner's line about a slot's draft cost goes to stderr)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": 6}) + "\n" for p in PROMPTS[:4]))
    r = infer("--input", inp, "--output", "-", "--parallel", 2, "--policy", "copy", "--verify")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(json.loads(line)["id"] for line in r.stdout.splitlines()) == [1, 2, 3, 4]
    assert "one draft token costs a slot" in r.stderr


@pytest.mark.real_model
def test_a_model_whose_passes_are_not_exact_decodes_one_prompt_at_a_time(tmp_path, monkeypatch, capsys):
    """On a GGUF whose batched passes round differently (exact_pass 3, as Qwen2.5-Coder Q4_K_M measures),
    --parallel auto keeps the one-at-a-time outputs by not sharing passes, and says why; an explicit N shares
    them with a warning; a lossy or sampled run shares them silently."""
    from gate.decode.cli import main
    from runtimes.llamacpp import LlamaCppBackend

    monkeypatch.setattr(LlamaCppBackend, "exact_pass", 3)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": 4}) + "\n" for p in PROMPTS[:3]))
    run = ["--backend", "llama.cpp", "--input", str(inp), "--threads", "1"]
    assert main(run + ["--output", str(tmp_path / "a.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "one prompt at a time" in err and "more than 3 tokens" in err
    assert json.loads((tmp_path / "a.jsonl.summary.json").read_text())["last_run"]["parallel"] == 1
    assert main(run + ["--output", str(tmp_path / "b.jsonl"), "--parallel", "3"]) == 0
    assert "warning: --parallel 3" in capsys.readouterr().err
    assert json.loads((tmp_path / "b.jsonl.summary.json").read_text())["last_run"]["parallel"] == 3
    assert main(run + ["--output", str(tmp_path / "c.jsonl"), "--parallel", "3", "-t", "0.8"]) == 0
    assert "more than 3 tokens" not in capsys.readouterr().err
    # the slots' inference-mode scopes interleave on one thread: the caller gets its grad mode back
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.mark.real_model
def test_kill_in_the_middle_of_a_parallel_run_then_resume_gives_each_prompt_once(tmp_path):
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"{PROMPTS[i % 7]} ({i})", "max_new_tokens": 16 + 4 * (i % 3)}) + "\n")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(ROOT / "infer.py"), "--backend", "llama.cpp", "--input", str(inp), "--output",
           str(out), "--parallel", "4"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert 3 <= out.read_text().count("\n") < 12
    assert infer("--input", inp, "--output", out, "--parallel", 4).returncode == 0
    ids = [r["id"] for r in map(json.loads, out.read_text().splitlines())]
    assert sorted(ids) == list(range(1, 13))                     # each prompt exactly once
    ref = tmp_path / "ref.jsonl"
    assert infer("--input", inp, "--output", ref, "--parallel", 1).returncode == 0
    assert all(rows(ref)[k]["output_ids"] == rows(out)[k]["output_ids"] for k in range(1, 13))


# -- several processes -------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow   # two fresh processes importing torch, accelerate and gloo: about a minute on 2 cores
def test_two_accelerate_processes_give_the_results_of_one(tiny_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt_ids": [5 + i, 9, 13 + i], "max_new_tokens": 4 + i % 3}) + "\n"
                           for i in range(7)) + '{"prompt": 3}\n')
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ["--model", tiny_dir, "--backend", "hf", "--policy", "big", "--input", str(inp)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "infer.py", *common, "--output", str(one)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]        # the bad last line
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "infer.py"]
    r = subprocess.run([*launch, *common, "--output", str(two)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "8 rows from 2 processes" in r.stderr, r.stderr[-3000:]
    a, b = rows(one), rows(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[k].get("output_ids") == b[k].get("output_ids") for k in a) and "error" in b[8]
    assert not list(tmp_path.glob("two.jsonl.part-*"))
    summary = json.loads(Path(f"{two}.summary.json").read_text())
    assert summary["last_run"]["processes"] == 2 and summary["results"] == 7 and summary["errors"] == 1
    # a re-run finds everything done
    r = subprocess.run([*launch[:-2], str(free_port()), "infer.py", *common, "--output", str(two)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert rows(two).keys() == b.keys()

