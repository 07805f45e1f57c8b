"""The draft planner: cost curves, the acceptance model, chain lengths by expected gain, the profile cache, and
planned --verify decoding token-identical to greedy big."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gate.decode.cost import (Acceptance, CostProfile, Planner, cache_file, copy_acceptance, load_or_measure,
                              measured_profile, profile_key, summarise_times, useful_chain)
from gate.decode.loop import Decoder
from gate.decode.policies import BigOnly, Copy, Gate
from gate.model import base
from gate.model.precision import CONTEXTS
from runtimes.hf import HFBackend

ROOT = Path(__file__).resolve().parents[1]


def profile(cost_of, ks=range(1, 33), step_ms=10.0) -> CostProfile:
    return CostProfile({}, step_ms, list(ks), [float(cost_of(k)) for k in ks])


LINEAR = profile(lambda n: n)                    # a pass of n tokens costs n steps: drafting never pays
CHEAP = profile(lambda n: 1 + 0.1 * (n - 1))     # a GPU-like curve: extra tokens almost free
LLAMA = profile(lambda n: {1: 1, 2: 1.56, 3: 2.0, 4: 2.39}.get(n, 2.39 + 0.45 * (n - 4)))   # measured shape


def test_profile_interpolates_and_extrapolates():
    p = profile(lambda n: n, ks=[1, 2, 4, 8])
    assert p.of(3) == pytest.approx(3) and p.of(16) == pytest.approx(16)
    assert p.ceiling(8) == pytest.approx(1.0)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 1.0])
def test_no_draft_when_a_pass_costs_k_steps(q):
    plan = Planner(LINEAR)
    assert plan.cut([q] * 10) == 0
    assert not plan.extend([q]) or q == 1.0     # a sure draft may look ahead, but is never kept
    plan.draft_ms = 1.0                          # and with a drafter that costs time, not even that
    assert not plan.extend([1.0])


def test_cheap_passes_keep_long_sure_chains():
    plan = Planner(CHEAP)
    assert plan.extend([0.95] * 5)
    probs = [0.95] * 20

    def rate(k):    # brute force: (1 + expected accepted of k drafts) / cost of a pass of k + 1 tokens
        return (1 + sum(0.95 ** i for i in range(1, k + 1))) / CHEAP.of(k + 1)
    assert plan.cut(probs) == max(range(21), key=rate) >= 15
    assert plan.cut([0.95, 0.95, 0.01, 0.9]) == 2    # a chain is cut before an unlikely draft


def test_measured_curve_needs_confidence():
    plan = Planner(LLAMA)
    assert plan.cut([0.3]) == 0 and not plan.extend([0.3])
    assert plan.cut([0.99] * 4) == 4
    # by hand: 3 drafts at 0.9 yield 1 + .9 + .81 + .729 tokens for cost(4) = 2.39 steps
    assert Planner(LLAMA).rate(0.9 + 0.81 + 0.729, 3, 0) == pytest.approx(3.439 / 2.39)
    # the highest rate, not the most tokens: 4 sure-ish drafts beat 12 on a curve that costs n/2 past 4
    probs = [0.95] * 12
    rates = [Planner(LLAMA).rate(sum(0.95 ** i for i in range(1, k + 1)), k, 0) for k in range(13)]
    assert Planner(LLAMA).cut(probs) == int(np.argmax(rates)) < 12


def test_a_fast_run_keeps_chains_that_beat_plain_steps():
    """Long copies elsewhere in the run (an achieved rate of 4 tokens per step) do not make these tokens cheaper:
    a chain that beats plain steps at this place is kept (pricing tokens at the run's rate cut it to none, and
    planned copy fell behind fixed chains on copy-rich text)."""
    slow, fast = Planner(LLAMA), Planner(LLAMA)
    fast.observe_cycle(tokens=4000, fed=1, proposals=0)
    assert fast.lam == pytest.approx(4.0) and slow.lam == 1.0
    probs = [0.8] * 3
    assert slow.cut(probs) == fast.cut(probs) == 3
    assert slow.cut([0.5]) == fast.cut([0.5]) == 0   # 1.5 tokens for 1.56 steps: no better than a plain step


def test_drafter_cost_counts():
    plan = Planner(LLAMA)
    assert plan.extend([0.8, 0.8])
    plan.draft_ms = LLAMA.step_ms           # a drafter as slow as the big model is not asked for more
    assert not plan.extend([0.8, 0.8])
    assert plan.cut([0.8, 0.8]) > 0         # but drafts already paid for are still worth verifying
    assert plan.extend([0.8, 0.8], free=True)   # and a free source (its copy rule, while it is held back) goes on


def test_planner_backs_off_when_nothing_pays():
    """A drafter whose proposals cost time (10% of a step) and never pay is asked at every 8th chain start or
    rarer; one that pays is always asked."""
    from gate.decode.cost import PROBE

    plan = Planner(LINEAR, draft_ms=1.0)
    starts = []
    for _ in range(80):
        go = plan.start_chain()
        starts.append(go)
        if go:
            plan.cut([0.2])
            plan.observe_cycle(tokens=1, fed=1, proposals=1)
        else:
            plan.observe_cycle(tokens=1, fed=1, proposals=0)
    assert starts[:8] == [True] * 8 and 1 <= sum(starts[8:]) <= 72 / PROBE
    assert plan.stats["skipped_starts"] == starts.count(False)


def test_a_free_source_is_asked_at_every_chain_start():
    """The copy rule (Policy.free) never backs off, even when a slow proposal made it look costly and its chains
    did not pay: a free source is never hidden behind probes (planner_for and --parallel pass backoff=False)."""
    assert Copy.free and not Gate.free and not BigOnly.free
    plan = Planner(LINEAR, draft_ms=1.0, backoff=False)
    for _ in range(40):
        assert plan.start_chain()
        plan.cut([0.2])
        plan.observe_cycle(tokens=1, fed=1, proposals=1)
    assert plan.stats["skipped_starts"] == 0 and plan.start_gain < 0
    paying = Planner(CHEAP, draft_ms=1.0)
    for _ in range(40):
        assert paying.start_chain()
        paying.observe_cycle(tokens=5, fed=5, proposals=4)


def test_acceptance_learns_from_outcomes():
    acc = Acceptance()
    assert acc.p(0.9) == pytest.approx(0.9)
    for _ in range(50):
        acc.update(0.9, False)
    assert acc.p(0.9) < 0.1 and acc.p(0.5) == pytest.approx(0.5)   # other bins keep their prior
    cp = copy_acceptance()
    assert cp.p(1) < cp.p(4) < cp.p(12)


def test_profile_key_changes_with_threads_and_file(tmp_path, tiny_llama):
    b = HFBackend(tiny_llama, name="tiny")
    f1, f2 = tmp_path / "a.gguf", tmp_path / "b.gguf"
    f1.write_bytes(b"x")
    f2.write_bytes(b"y")
    keys = []
    for path, threads in ((f1, 1), (f1, 2), (f2, 1)):
        b.path, b.n_threads = path, threads
        keys.append(cache_file(profile_key(b)))
    assert len(set(keys)) == 3
    assert profile_key(b)["file"] == str(f2.resolve()) and profile_key(b)["threads"] == 1


def test_load_or_measure_caches(tmp_path, monkeypatch, tiny_llama, one_thread):
    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    monkeypatch.setattr("gate.decode.cost.NOISY", float("inf"))   # a tiny model's passes are too short to agree
    monkeypatch.setattr("common.cpu.QUIET_CORES", float("inf"))   # and the suite may share the machine
    b = HFBackend(tiny_llama, name="tiny")
    p = load_or_measure(b, ks=(1, 2, 4), reps=2)
    assert p.ks == [1, 2, 4] and p.cost[0] == 1.0 and all(c > 0 for c in p.cost)
    assert cache_file(p.key).is_file() and b.n_cached == 0
    again = load_or_measure(b, ks=(1, 2), reps=2)
    assert again.measured == p.measured          # read from the cache, not measured again


# -- planned decoding is lossless ---------------------------------------------------------------------------
def greedy(big: HFBackend, ids, n):
    return Decoder(big, BigOnly()).generate(ids, n).ids


@pytest.mark.parametrize("curve", [CHEAP, LLAMA, LINEAR])
def test_planned_copy_verify_is_greedy_big(tiny_llama, curve, one_thread):
    big = HFBackend(tiny_llama, name="tiny")
    pol = Copy(min_match=1, max_skip=33)
    plan = Planner(curve, pol.acceptance())
    for ids in ([5, 6, 7, 5, 6, 7, 5, 6], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9, 9, 9, 9]):
        ref = greedy(big, ids, 40)
        res = Decoder(big, pol, verify=True, planner=plan).generate(ids, 40)
        assert res.ids == ref
        assert res.ledger["plan"]["chains"] >= 0
    if curve is LINEAR:
        assert plan.stats["kept"] == 0


def test_planned_gate_verify_is_greedy_big(tiny_llama, one_thread):
    """A drafter right at random half of the time, scores uninformative: planned output equals greedy big."""
    import random

    big = HFBackend(tiny_llama, name="tiny")
    rng = random.Random(0)

    class Drafter(base.Drafter):
        threshold, max_skip, hidden_layer = -1.0, 16, None

        def propose(self, ids, hidden, s):
            with torch.no_grad():
                tok = int(tiny_llama(torch.tensor([list(ids)])).logits[0, -1].argmax())
            return (tok if rng.random() < 0.7 else (tok + 1) % 300), rng.random()

    pol = Gate(Drafter())
    plan = Planner(CHEAP, pol.acceptance())
    for ids in ([5, 6, 7], [11, 12, 13, 14, 15]):
        assert Decoder(big, pol, verify=True, planner=plan).generate(ids, 30).ids == greedy(big, ids, 30)
    assert plan.stats["kept"] > 0


def test_the_copy_rule_drafts_while_a_costly_drafter_is_held_back(tiny_llama, one_thread):
    """A gate whose learned part costs a millisecond and is always wrong gets held back by the planner; its copy
    rule (the free source, scored by the artifact's copy maps) is still asked at every held-back chain start, its
    drafts are kept, and the output is greedy big's."""
    import time as _time

    from gate.model.copyrule import CopyIndex
    from gate.model.precision import PrecisionMap, SourceMaps

    big = HFBackend(tiny_llama, name="tiny")
    sure = PrecisionMap(np.array([0.0, 1.0]), np.array([0.0, 0.97]))    # any match: 97%
    asked = []

    class Drafter(base.Drafter):
        threshold, max_skip, hidden_layer = -1.0, 16, None
        copies, extend = CopyIndex(12), 0
        scoring = SourceMaps({c: PrecisionMap(np.array([0.0]), np.array([0.0])) for c in CONTEXTS},
                             {"agree": sure, "disagree": sure}, 12, 0)

        def propose(self, ids, hidden, s):
            _time.sleep(0.001)
            return (ids[-1] + 1) % 300, 0.0

        def propose_free(self, ids):
            asked.append(len(ids))
            return super().propose_free(ids)

    pol = Gate(Drafter())
    plan = Planner(profile(lambda n: 1 + 0.2 * (n - 1), step_ms=5.0), pol.acceptance())
    ids = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]
    res = Decoder(big, pol, verify=True, planner=plan).generate(ids, 60)
    assert res.ids == greedy(big, ids, 60)
    assert plan.stats["skipped_starts"] > 0 and len(asked) >= plan.stats["skipped_starts"]
    assert plan.stats["free_drafts"] > 0 and res.ledger["plan"]["free_drafts"] == plan.stats["free_drafts"]


def test_a_lossy_gate_holds_back_a_drafter_that_does_not_pay(tiny_llama, one_thread):
    """Without --verify the planner only holds the learned part back: a drafter that costs a millisecond and never
    clears the threshold is asked at a few probes, not every step; its copy rule still skips where it is sure."""
    import time as _time

    from gate.model.copyrule import CopyIndex
    from gate.model.precision import PrecisionMap, SourceMaps

    big = HFBackend(tiny_llama, name="tiny")
    sure = PrecisionMap(np.array([0.0, 1.0]), np.array([0.0, 0.97]))
    calls = []

    class Drafter(base.Drafter):
        threshold, max_skip, hidden_layer = 0.9, 8, None
        copies, extend = CopyIndex(12), 0
        scoring = SourceMaps({c: PrecisionMap(np.array([0.0]), np.array([0.0])) for c in CONTEXTS},
                             {"agree": sure, "disagree": sure}, 12, 0)

        def propose(self, ids, hidden, s):
            calls.append(len(ids))
            _time.sleep(0.001)
            return (ids[-1] + 1) % 300, 0.0

    pol = Gate(Drafter())
    plan = Planner(profile(lambda n: 1 + 0.2 * (n - 1), step_ms=5.0), pol.acceptance())
    res = Decoder(big, pol, verify=False, planner=plan).generate([5, 6, 7, 8, 5, 6, 7, 8, 9], 80)
    steps = res.ledger["big_calls"]
    assert plan.stats["skipped_starts"] > 0 and len(calls) < steps / 2, (len(calls), steps)
    assert res.ledger["plan"]["skipped_starts"] == plan.stats["skipped_starts"]


def test_no_entry_point_changes_openmp_settings():
    """infer.py, train.py and the bench scripts leave OMP_WAIT_POLICY as the user set it, and set none. One fresh
    interpreter (not one per script and setting: each imports torch anew) runs every script's top level, first
    with the variable unset, so every module the scripts import is imported then, then with it set."""
    scripts = [str(ROOT / s) for s in ("infer.py", "train.py", "bench/decode.py", "bench/llamacpp.py")]
    code = ("import os, runpy, sys\n"
            "sys.argv = ['x']\n"
            "for user in (None, 'ACTIVE'):\n"
            f"    for script in {scripts!r}:\n"
            "        os.environ.pop('OMP_WAIT_POLICY', None)\n"
            "        os.environ.update({'OMP_WAIT_POLICY': user} if user else {})\n"
            "        runpy.run_path(script, run_name='imported')\n"
            "        after = os.environ.get('OMP_WAIT_POLICY', '<unset>')\n"
            "        print('OMP', script, user or '<unset>', after, sep='\\t')\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    seen = [line.split("\t")[1:] for line in out.stdout.splitlines() if line.startswith("OMP\t")]
    assert [(script, user) for script, user, _ in seen] == [(s, u) for u in ("<unset>", "ACTIVE") for s in scripts]
    for script, user, after in seen:
        assert after == user, (script, user, after)


def test_acceptance_learns_per_depth_from_the_shallower_estimate():
    """A deep draft starts as likely as the bucket before it and then follows its own counts: copies that hold
    for 4 drafts and break at the 5th teach the planner that depth 5 fails while depth 1-4 stay sure."""
    acc = copy_acceptance()
    assert acc.p(12, depth=9) == pytest.approx(acc.p(12, depth=1))
    for _ in range(30):
        for depth in range(1, 5):
            acc.update(12, True, depth=depth)
        acc.update(12, False, depth=5)
    assert acc.p(12, depth=4) > 0.95 and acc.p(12, depth=5) < 0.2
    assert acc.p(12, depth=6) < 0.2          # deeper buckets without counts of their own inherit depth 5's
    assert acc.learned()["12/6"] == [0.0, 30]


def test_chains_stop_where_the_ceiling_flattens():
    ks = list(range(1, 34))
    flat_after_16 = CostProfile({}, 10.0, ks, [1 + 0.4 * (k - 1) if k <= 16 else 7.0 + 0.5 * (k - 16) for k in ks])
    assert 8 <= useful_chain(flat_after_16) <= 16
    assert useful_chain(CHEAP) >= 24                    # extra tokens nearly free: long chains
    assert Planner(CHEAP, Acceptance()).max_chain == useful_chain(CHEAP)
    assert Planner(CHEAP, Acceptance(), max_chain=5).max_chain == 5


def spin(seconds: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


def fake_measurement(seconds: float = 0.8):
    """A `run` for measured_profile that keeps this process busy for a while and reports a clean curve."""
    def run():
        spin(seconds)
        return 10.0, [1.0, 1.6], 0.01
    return run


def test_a_curve_measured_while_another_process_burns_a_core_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        said = []
        p = measured_profile({"test": "burn"}, (1, 2), "a test curve", fake_measurement(), log=said.append)
    finally:
        burner.kill()
        burner.wait()
    assert p.cost == [1.0, 1.6] and not cache_file(p.key).exists()
    assert "not cached" in said[-1] and "other processes kept" in said[-1]
    assert float(p.measured.split("kept ")[1].split(" cores")[0]) > 0.5


def test_a_curve_measured_right_after_own_heavy_work_is_cached(tmp_path, monkeypatch):
    """This process's own work just before (it raises the load average) does not count against a measurement."""
    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    a = torch.randn(512, 512)
    t = time.perf_counter()
    while time.perf_counter() - t < 1.5:       # both cores busy in this process
        a = torch.tanh(a @ a)
    said = []
    p = measured_profile({"test": "own"}, (1, 2), "a test curve", fake_measurement(), log=said.append)
    assert cache_file(p.key).is_file() and "cached in" in said[-1], said
    again = measured_profile({"test": "own"}, (1, 2), "a test curve", lambda: pytest.fail("measured again"))
    assert again.measured == p.measured


def test_a_curve_whose_passes_disagree_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    said = []
    p = measured_profile({"test": "noisy"}, (1, 2), "a test curve", lambda: (10.0, [1.0, 1.6], 0.3),
                         log=said.append)
    assert not cache_file(p.key).exists() and "differed by 30%" in said[-1]


def test_summarise_times_spread():
    step, cost, spread = summarise_times({1: [0.010, 0.011, 0.009, 0.010, 0.013], 2: [0.016] * 3}, (1, 2))
    assert step == pytest.approx(10.0) and cost == [1.0, 1.6] and spread == pytest.approx(0.05)
