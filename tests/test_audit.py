"""The audit of a lossy decode (gate/decode/audit.py): the catch-up rows judge the unchecked skips after the fact,
the bar moves by the error bound, the ledger reports it, and --audit / --no-audit on the CLI. Tiny models only."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from common.errors import UsageError
from gate.decode.audit import Audit, binom_cdf, calibrated_target, error_bound, higher, sum_audits
from gate.decode.cli import build_parser, main
from gate.decode.ledger import Ledger, format_ledgers, sum_ledgers
from gate.decode.loop import Decoder
from gate.decode.policies import Gate
from gate.decode.session import make_policy
from gate.model.features import NEVER
from runtimes.hf import HFBackend, early_exit_view
from runtimes.open import Runtime

from helpers import PROMPTS, FnDrafter, assert_one_error_line, call_main, greedy, ledger_adds_up, lively, save_model

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread is pure overhead


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, tiny_llama_pair):
    big, small = tiny_llama_pair
    return tiny_tokenizer, lively(big, 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    """The lively tiny model as a local HF folder, for infer.py's main (its self:1 is a poor gate: it errs)."""
    tok, big = tiny
    return save_model(tmp_path_factory.mktemp("lively"), big, tok)


def oracle(big_model, wrong=lambda score: False, score=lambda rng: rng.random()):
    """A drafter function: the big model's greedy token, or another one where wrong(score); a score per
    position from a seeded generator."""
    def fn(ids, hidden, since_big):
        with torch.no_grad():
            logits = big_model(torch.tensor([ids])).logits[0, -1]
        best = int(logits.argmax())
        s = score(random.Random(hash((len(ids), ids[-1]))))
        return ((best + 1) % logits.shape[-1] if wrong(s) else best), s
    return fn


def run(big, policy, ids, n=40, **kw):
    bb = HFBackend(big, "big")
    res = Decoder(bb, policy, **kw).generate(ids, n)
    ledger_adds_up(res, bb)
    return res


def argmax_misses(big_model, prompt, out) -> list[int]:
    """Indices of the generated tokens that are not the big model's argmax on their prefix (one teacher-forced
    pass, as --check makes)."""
    with torch.no_grad():
        rows = big_model(torch.tensor([list(prompt) + list(out)])).logits[0, len(prompt) - 1:-1]
    return [i for i, t in enumerate(out) if int(rows[i].argmax()) != t]


def audited_at(sources) -> list[int]:
    """The skips a later big pass covered: every skip before the last big token (lossy, no rollback)."""
    last = max(i for i, s in enumerate(sources) if s == "big")
    return [i for i, s in enumerate(sources[:last]) if s != "big"]


def infer(model_dir, tmp_path, prompt, *argv) -> dict:
    out = tmp_path / "out.json"
    rc, err = call_main(main, [prompt, "--model", model_dir, "--backend", "hf", "--policy", "gate", "--small",
                               "self:1", "--max-skip", "6", "-m", "60", "--quiet", "--json", out, *argv])
    assert rc == 0, err[-2000:]
    return json.loads(out.read_text())


# -- (a) the audit counts what --check finds ----------------------------------------------------------------
def test_audited_mismatches_are_checks_mismatches_on_the_skips(tiny):
    tok, big = tiny
    misses = 0
    for k, prompt in enumerate(PROMPTS[:4]):
        ids = tok(prompt).input_ids
        gate = Gate(FnDrafter(oracle(big, wrong=lambda s: s < 0.25), threshold=0.0, max_skip=5))
        res = run(big, gate, ids, 40, audit=Audit(target_error=0.3))
        a = res.ledger["audit"]
        wrong = argmax_misses(big, ids, res.ids)
        covered = audited_at(res.sources)
        assert a["audited"] == len(covered) and a["not_audited"] == res.ledger["skipped"] - len(covered)
        assert a["mismatch_at"] == [i for i in covered if i in wrong] and a["mismatches"] == len(a["mismatch_at"])
        assert set(wrong) <= set(i for i, s in enumerate(res.sources) if s != "big")   # big tokens are argmax
        assert a["error"] == pytest.approx(a["mismatches"] / a["audited"], abs=1e-6)
        assert a["bound"] == pytest.approx(error_bound(a["mismatches"], a["audited"]), abs=1e-6)
        misses += a["mismatches"]
    assert misses > 0


def test_cli_audit_and_check_agree(model_dir, tiny, tmp_path):
    tok, big = tiny
    for prompt in PROMPTS[:2]:
        r = infer(model_dir, tmp_path, prompt, "--threshold", "0.05", "--check")
        a, check = r["ledger"]["audit"], r["ledger"]["check"]
        wrong = argmax_misses(big, r["prompt_ids"], r["output_ids"])
        covered = audited_at(r["sources"])
        assert a["mismatches"] > 0 and a["mismatch_at"] == [i for i in covered if i in wrong]
        tail = [i for i in wrong if i not in covered]        # skips after the last big pass: not audited
        assert check["mismatches"] == len(wrong) == a["mismatches"] + len(tail)
        assert a["target"] == 0.01 and a["threshold"] == 0.05 and a["threshold_path"]


# -- (b) a drafter that is wrong on purpose -------------------------------------------------------------------
def test_an_always_wrong_drafter_is_stopped(tiny):
    tok, big = tiny
    ids = tok(PROMPTS[1]).input_ids
    gate = Gate(FnDrafter(oracle(big, wrong=lambda s: True, score=lambda rng: 0.9), threshold=0.5, max_skip=4))
    res = run(big, gate, ids, 60, audit=Audit())
    a = res.ledger["audit"]
    bars = [t for _, t in a["threshold_path"]]
    assert bars == [0.75, 0.875, 0.9375] and a["final_threshold"] == 0.9375
    assert a["mismatches"] == a["audited"] > 0                  # every audited skip was wrong ...
    last = a["threshold_path"][-1][0]
    assert set(res.sources[last:]) == {"big"}                   # ... and after the last raise nothing is skipped
    assert gate.threshold == 0.5                                # the configured threshold is untouched
    again = run(big, gate, ids, 60)                             # a new text starts at the calibrated bar
    assert again.sources[:4] == ["big", "skip", "skip", "skip"]


def test_the_bar_rises_past_the_wrong_scores_and_the_error_after_stays_under_the_bound(tiny):
    tok, big = tiny
    after_audited = after_wrong = 0
    for prompt in PROMPTS[:3]:
        ids = tok(prompt).input_ids
        gate = Gate(FnDrafter(oracle(big, wrong=lambda s: s < 0.8), threshold=0.3, max_skip=4))
        res = run(big, gate, ids, 80, audit=Audit())
        a = res.ledger["audit"]
        bars = [t for _, t in a["threshold_path"]]
        assert bars == sorted(bars) and bars[-1] >= 0.8           # it rose past every wrong score, and stopped
        last = a["threshold_path"][-1][0]
        wrong = set(argmax_misses(big, ids, res.ids))
        skips = [i for i in audited_at(res.sources) if i >= last]
        after_audited += len(skips)
        after_wrong += len([i for i in skips if i in wrong])
        assert all(i < last for i in a["mismatch_at"])
    assert after_audited > 0 and after_wrong == 0
    assert after_wrong / after_audited <= error_bound(after_wrong, after_audited)


def test_verify_below_moves_the_verify_bar_not_the_gates(tiny):
    tok, big = tiny
    ids = tok(PROMPTS[2]).input_ids
    score = lambda rng: rng.choice([0.5, 0.95])   # noqa: E731
    gate = Gate(FnDrafter(oracle(big, wrong=lambda s: True, score=score), threshold=0.4, max_skip=4))
    res = run(big, gate, ids, 60, verify=True, verify_below=0.9, audit=Audit())
    a = res.ledger["audit"]
    assert a["threshold"] == 0.9 and [t for _, t in a["threshold_path"]] == [0.95, 0.975]
    assert gate.live_threshold is None and res.ledger["verified"] > 0 and res.ledger["verify_below"] == 0.9
    # wrong drafts scored 0.5 are checked and rolled back; once the bar passed 0.95, so are those scored 0.95
    last = a["threshold_path"][-1][0]
    assert set(res.sources[last:]) == {"big"} and res.ids[last:] == greedy(big, ids + res.ids[:last], 60 - last)
    assert a["mismatches"] == a["audited"] > 0


# -- (c) lossless: nothing to audit ---------------------------------------------------------------------------
def test_lossless_verify_audits_nothing(tiny):
    tok, big = tiny
    ids = tok(PROMPTS[3]).input_ids
    fn = oracle(big, wrong=lambda s: s < 0.5)
    plain = run(big, Gate(FnDrafter(fn, threshold=0.2, max_skip=4)), ids, 30, verify=True)
    audited = run(big, Gate(FnDrafter(fn, threshold=0.2, max_skip=4)), ids, 30, verify=True, audit=Audit())
    assert "audit" not in audited.ledger and audited.ids == plain.ids == greedy(big, ids, 30)
    assert audited.ledger["verified"] > 0
    sampled = run(big, Gate(FnDrafter(fn, threshold=0.2, max_skip=4)), ids, 30, temperature=0.8, audit=Audit())
    assert "audit" not in sampled.ledger                         # greedy only


def test_cli_verify_has_no_audit(model_dir, tmp_path):
    r = infer(model_dir, tmp_path, PROMPTS[0], "--threshold", "0.05", "--verify", "--plan", "fixed")
    off = infer(model_dir, tmp_path, PROMPTS[0], "--threshold", "0.05", "--verify", "--plan", "fixed", "--no-audit")
    assert "audit" not in r["ledger"] and r["output_ids"] == off["output_ids"] and r["sources"] == off["sources"]


# -- (d) the flags, and --no-audit is the decode as before --------------------------------------------------
def test_flags_parse():
    p = build_parser()
    assert p.parse_args(["x", "--policy", "gate"]).audit is None
    assert p.parse_args(["x", "--policy", "gate", "--audit"]).audit is True
    a = p.parse_args(["x", "--policy", "gate", "--no-audit", "--audit-target", "0.05"])
    assert a.audit is False and a.audit_target == 0.05
    assert "--audit, --no-audit" in p.format_help()


@pytest.mark.parametrize("argv,message", [
    (["--policy", "gate", "--small", "self:1", "--audit", "--verify"],
     "--audit watches a lossy decode, and --verify checks every skip already"),
    (["--policy", "gate", "--small", "self:1", "--audit", "-t", "0.7"],
     "--audit compares skips with the big model's greedy token: it needs -t 0"),
    (["--policy", "copy", "--no-audit"], "--audit is read by --policy gate, not by --policy copy"),
])
def test_meaningless_audits_are_refused(argv, message):
    argv = ["x", *argv]
    assert_one_error_line(*call_main(main, argv), message, "infer.py: error:")


def test_audit_target_is_checked(tiny, tiny_tokenizer):
    _, big = tiny
    rt = Runtime(tiny_tokenizer, HFBackend(big, "big"), big_info=None, predictors={"s": HFBackend(big, "s")})
    for bad in ("0", "1", "nan"):
        args = build_parser().parse_args(["x", "--policy", "gate", "--small", "s", "--audit-target", bad])
        with pytest.raises(UsageError, match=r"--audit-target must be a number in \(0, 1\)"):
            make_policy(args, rt)


def test_no_audit_is_the_decode_without_audit(model_dir, tiny, tmp_path):
    tok, big = tiny
    for threshold in ("0.05", "0.2"):
        r = infer(model_dir, tmp_path, PROMPTS[1], "--threshold", threshold, "--no-audit")
        small = HFBackend(early_exit_view(big, 1), "self:1")   # self:1 as the CLI opens it
        gate = Gate.small_lm(small, threshold=float(threshold), max_skip=6)
        want = Decoder(HFBackend(big, "big"), gate, eos_ids=(tok.eos_token_id,)).generate(r["prompt_ids"], 60)
        assert "audit" not in r["ledger"] and r["output_ids"] == want.ids and r["sources"] == want.sources


def test_an_audit_that_never_moves_only_observes(tiny):
    tok, big = tiny
    for prompt in PROMPTS[:3]:
        ids = tok(prompt).input_ids
        fn = oracle(big)                                           # never wrong: the bar never moves
        plain = run(big, Gate(FnDrafter(fn, threshold=0.3, max_skip=5)), ids, 40)
        audited = run(big, Gate(FnDrafter(fn, threshold=0.3, max_skip=5)), ids, 40, audit=Audit())
        a = audited.ledger["audit"]
        assert audited.ids == plain.ids and audited.sources == plain.sources
        assert a["audited"] > 0 and a["mismatches"] == 0 and a["threshold_path"] == []
        assert {k: v for k, v in audited.ledger.items() if k not in ("audit", "wall_s", "tokens_per_s", "policy_s")} \
            == {k: v for k, v in plain.ledger.items() if k not in ("wall_s", "tokens_per_s", "policy_s")}


# -- the rules, the bound, the ledger ----------------------------------------------------------------------------
def test_bound_is_clopper_pearson():
    from scipy.stats import beta, binom

    for k, n in [(0, 1), (0, 20), (1, 10), (3, 50), (7, 9), (0, 460), (12, 1000), (150, 2000)]:
        assert error_bound(k, n) == pytest.approx(float(beta.ppf(0.9, k + 1, n - k)), rel=1e-9, abs=1e-12)
        assert binom_cdf(k, n, 0.03) == pytest.approx(float(binom.cdf(k, n, 0.03)), rel=1e-9, abs=1e-15)
    assert error_bound(5, 5) == error_bound(0, 0) == 1.0


def test_steps_and_rules():
    assert [higher(t) for t in (0.8, 0.9996, -math.inf, 1.0, NEVER)] == pytest.approx([0.9, 0.9998, 0.5, NEVER, NEVER])
    assert higher(1 - 1.5e-6) == NEVER
    a = Audit(target_error=0.2)
    a.start(0.8)
    assert a.observe(3, [(1, True), (2, True)]) is None           # no mismatch: no raise, whatever the bound
    assert a.observe(5, [(4, False)]) == 0.9 and a.path == [[5, 0.9]] and a.window == [0, 0]
    ups = [a.observe(9 + i, [(8 + i, True)]) for i in range(30)]   # bound(0, n) < 0.1 from n = 22 on
    assert ups[:21] == [None] * 21 and ups[21] == 0.8 and a.path[-1] == [30, 0.8]
    assert all(a.observe(50 + i, [(49 + i, True)] * 5) is None for i in range(10))   # never below the floor
    assert (a.audited, a.mismatches, a.mismatch_at) == (83, 1, [4])
    counts = Audit()
    counts.start(None)                                            # no bar: counts only
    assert counts.observe(2, [(1, False)]) is None and counts.mismatches == 1


def test_target_from_the_drafters_metadata():
    assert calibrated_target(None) is None and calibrated_target({"threshold": 0.9}) is None
    assert calibrated_target({"target_precision": 0.98}) == 0.02                            # heads: the fit's
    assert calibrated_target({"calibration": {"target_precision": 0.95}}) == 0.05            # router
    assert calibrated_target({"calibration": {"gate": {"target_precision": 0.97}}}) == 0.03  # eagle
    heads = {"primary_gate": "mlp", "target_precision": 0.99,
             "calibration": {"lr": {"target_precision": 0.9}, "mlp": {"target_precision": 0.995}}}
    assert calibrated_target(heads) == 0.005
    assert calibrated_target({**heads, "recalibrated": {"target_precision": 0.98}}) == 0.02


def test_ledger_round_trip_and_sum(tiny):
    tok, big = tiny
    leds = []
    for prompt, audit in zip(PROMPTS[:3], (Audit(), Audit(), None)):
        gate = Gate(FnDrafter(oracle(big, wrong=lambda s: s < 0.6), threshold=0.3, max_skip=4))
        leds.append(run(big, gate, tok(prompt).input_ids, 30, audit=audit).ledger)
    assert "audit" not in leds[2] and Ledger.from_dict(leds[0]).to_dict() == leds[0]
    total = sum_ledgers([Ledger.from_dict(d) for d in leds])
    a = total.audit
    assert a["audited"] == leds[0]["audit"]["audited"] + leds[1]["audit"]["audited"] and a["runs"] == 2
    assert a["threshold_paths"] == [leds[0]["audit"]["threshold_path"], leds[1]["audit"]["threshold_path"]]
    assert a["bound"] == pytest.approx(error_bound(a["mismatches"], a["audited"]), abs=1e-6)
    assert sum_audits([a, leds[0]["audit"]])["runs"] == 3
    table = format_ledgers({"with": Ledger.from_dict(leds[0]), "sum": total})
    assert "\naudit " in table and "target 1%" in table and f"raised in {a['runs_raised']} of 2 runs" in table
    assert "audit" not in format_ledgers({"without": Ledger.from_dict(leds[2])})


def test_batch_rows_and_summary_carry_the_audit(model_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "out.jsonl"
    assert main(["--model", model_dir, "--backend", "hf", "--input", str(inp), "--output", str(out), "-m", "30",
                 "--policy", "gate", "--small", "self:1", "--threshold", "0.05", "--max-skip", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["ledger"]["audit"]["audited"] > 0 for r in rows)
    assert "raised in" in capsys.readouterr().err


# -- --audit-scope job: the bar and its evidence carry from prompt to prompt ----------------------------------
def test_a_carried_audit_starts_the_next_text_at_the_raised_bar(tiny):
    tok, big = tiny
    ids = tok(PROMPTS[1]).input_ids
    gate = Gate(FnDrafter(oracle(big, wrong=lambda s: True, score=lambda rng: 0.9), threshold=0.5, max_skip=4))
    audit = Audit(carry=True)
    first = run(big, gate, ids, 60, audit=audit).ledger["audit"]
    assert first["final_threshold"] == 0.9375 and first["start_threshold"] == 0.5
    second = run(big, gate, ids, 60, audit=audit)
    a = second.ledger["audit"]
    assert a["start_threshold"] == 0.9375 and a["threshold"] == 0.5        # floor: still the calibrated bar
    assert a["audited"] == 0 and set(second.sources) == {"big"}           # scores of 0.9 no longer pass
    # the per-prompt default starts every text at the calibrated bar
    assert run(big, gate, ids, 60, audit=Audit()).sources[:4] == ["big", "skip", "skip", "skip"]
    s = sum_audits([first, a])
    assert s["audited"] == first["audited"] and s["final_threshold"] == 0.9375


def test_batch_job_scope_carries_the_bar_and_needs_one_prompt_at_a_time(model_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    argv = ["--model", model_dir, "--backend", "hf", "--input", str(inp), "-m", "30", "--policy", "gate",
            "--small", "self:1", "--threshold", "0.05", "--max-skip", "6"]
    rows = {}
    for scope in ("prompt", "job"):
        out = tmp_path / f"{scope}.jsonl"
        assert main(argv + ["--output", str(out), "--audit-scope", scope]) == 0
        rows[scope] = [json.loads(line)["ledger"]["audit"] for line in out.read_text().splitlines()]
    per, job = rows["prompt"], rows["job"]
    assert all(a["start_threshold"] == a["threshold"] for a in per)
    assert job[0] == {**per[0], "carried": True}                           # the first prompt is the same
    assert job[1]["start_threshold"] == job[0]["final_threshold"] > job[0]["threshold"]
    rc, err = call_main(main, argv + ["--output", str(tmp_path / "p.jsonl"), "--audit-scope", "job",
                                      "--parallel", "2"])
    assert_one_error_line(rc, err, "--audit-scope job")
