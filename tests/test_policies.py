"""Policies: the fixed-ratio schedule, entropy-gated switching and its variants, the cascade, the gate."""
from __future__ import annotations

import math

import pytest
import torch

from gate.decode.drafters import SmallLMDrafter
from gate.decode.loop import Decoder
from gate.decode.policies import Cascade, Copy, Entropy, Gate, Ratio, SmallOnly, entropy
from runtimes.hf import HFBackend, early_exit_view

from helpers import PROMPTS, FnDrafter, greedy, ledger_adds_up, lively

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread is pure overhead


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, tiny_llama_pair):
    big, small = tiny_llama_pair
    return tiny_tokenizer, lively(big, 1), lively(small, 2)


def run(big, policy, ids, n=30, **kw):
    bb = HFBackend(big, "big")
    res = Decoder(bb, policy, **kw).generate(ids, n)
    ledger_adds_up(res, bb)
    return res


def fixed_ratio_sources(n, r, min_tokens):
    """The fixed-ratio rule, written out: token i is small iff i >= min_tokens and (i - min) % int(1/r) == 0."""
    interval = int(1 / r) if r > 0 else 0
    out = []
    for i in range(n):
        small = i >= min_tokens and interval > 0 and (i - min_tokens) % interval == 0
        out.append("small" if small else ("scaffold" if i < min_tokens else "big"))
    return out


@pytest.mark.parametrize("r,min_tokens", [(0.5, 10), (0.33, 5), (0.25, 0), (1.0, 3), (0.7, 2), (0.1, 1),
                                          (0.0, 4)])
def test_ratio_puts_small_tokens_where_the_fixed_ratio_rule_says(tiny, r, min_tokens):
    tok, big, small = tiny
    ids = tok(PROMPTS[0]).input_ids
    res = run(big, Ratio(HFBackend(small, "small"), r, min_tokens), ids, 30)
    assert res.sources == fixed_ratio_sources(30, r, min_tokens)
    assert res.ledger["skipped"] == res.sources.count("small")


def test_ratio_zero_is_big_only_and_bad_ratios_refused(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[1]).input_ids
    assert run(big, Ratio(None, 0.0, 5), ids, 20).ids == greedy(big, ids, 20)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            Ratio(HFBackend(small, "s"), bad)
    with pytest.raises(ValueError):
        Ratio(None, 0.5)


def test_entropy_extremes(tiny):
    tok, big, small = tiny
    for prompt in PROMPTS[:3]:
        ids = tok(prompt).input_ids
        sb = HFBackend(small, "small")
        small_only = run(big, SmallOnly(sb), ids, 25)
        hi = run(big, Entropy(sb, math.inf), ids, 25)
        assert hi.ids == small_only.ids and set(hi.sources) == {"small"}
        assert hi.ledger["big_calls"] == 0
        lo = run(big, Entropy(sb, -math.inf), ids, 25)
        assert lo.ids == greedy(big, ids, 25) and set(lo.sources) == {"big"}
        assert lo.ledger["predictor_calls"] == 0
        for k in (2, 3):
            assert run(big, Entropy(sb, math.inf, lookahead=k), ids, 25).ids == small_only.ids
            assert run(big, Entropy(sb, -math.inf, lookahead=k), ids, 25).ids == lo.ids


def test_entropy_switches_on_the_small_models_entropy(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[2]).input_ids
    sb = HFBackend(small, "small")
    res = run(big, Entropy(sb, 0.5), ids, 30)
    assert {"small", "big"} <= set(res.sources)
    # replay: at each position the small model's normalised entropy decides who spoke
    text = ids + res.ids
    with torch.no_grad():
        logits = small(torch.tensor([text])).logits[0].float()
    for i, s in enumerate(res.sources):
        h = entropy(logits[len(ids) + i - 1])
        assert (s == "small") == (h <= 0.5), (i, h, s)
    # raw entropy (nats): the same decisions at tau * log|V|
    raw = run(big, Entropy(sb, 0.5 * math.log(small.lm_head.weight.shape[0]), normalize=False), ids, 30)
    assert raw.sources == res.sources


def test_entropy_span_n_keeps_the_big_model(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[3]).input_ids
    res = run(big, Entropy(HFBackend(small, "small"), 0.5, span=4), ids, 40)
    s = res.sources
    triggers = [i for i in range(len(s)) if s[i] == "big" and (i == 0 or s[i - 1] == "small")]
    assert triggers
    for i in triggers:
        assert s[i:i + 4] == ["big"] * len(s[i:i + 4])


def test_entropy_span_line_keeps_the_big_model_to_the_newline(tiny):
    tok, big, small = tiny
    nl = tok("\n").input_ids
    assert len(nl) == 1

    class NewlineEvery5:   # a big model that writes a newline every 5th position
        def __init__(self, b):
            self.b, self.name = b, b.name

        def __getattr__(self, k):
            return getattr(self.b, k)

        def forward(self, tokens, keep=None, copy=True):
            logits, h = self.b.forward(tokens, keep)
            logits = logits.clone()
            for r in range(logits.shape[0]):
                if (self.b.n_cached - logits.shape[0] + r) % 5 == 0:
                    logits[r, nl[0]] = 1e4
            return logits, h

    ids = tok(PROMPTS[0]).input_ids
    pol = Entropy(HFBackend(small, "small"), 0.5, span="line", tokenizer=tok)
    res = Decoder(NewlineEvery5(HFBackend(big, "big")), pol).generate(ids, 40)
    s, toks = res.sources, res.ids
    triggers = [i for i in range(len(s)) if s[i] == "big" and (i == 0 or s[i - 1] == "small")]
    assert triggers
    for i in triggers:   # big from the trigger through the next newline
        j = i
        while j < len(s) and "\n" not in tok.decode([toks[j]]):
            assert s[j] == "big"
            j += 1
        if j < len(s):
            assert s[j] == "big"


def test_entropy_lookahead_decides_on_the_mean(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[4]).input_ids
    res = run(big, Entropy(HFBackend(small, "small"), 0.55, lookahead=3), ids, 40)
    runs, cur = [], 0
    for s in res.sources + ["big"]:
        if s == "small":
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    assert runs and all(r % 3 == 0 for r in runs[:-1])   # small tokens come in whole lookahead blocks


def test_entropy_adaptive_threshold_moves(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[5]).input_ids
    pol = Entropy(HFBackend(small, "small"), 0.02, adaptive=True, adapt_run=2)   # always "high"
    run(big, pol, ids, 20)
    assert pol.tau_now == pytest.approx(0.01)                                    # floor tau / 2
    pol = Entropy(HFBackend(small, "small"), 5.0, adaptive=True, adapt_run=2)    # always "low"
    run(big, pol, ids, 20)
    assert pol.tau_now == pytest.approx(10.0)                                    # cap 2 tau


def test_entropy_pattern_forces_the_big_model(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[0]).input_ids
    pol = Entropy(HFBackend(small, "small"), math.inf, pattern=r"[aeiou]", tokenizer=tok)
    res = run(big, pol, ids, 40)
    text = ids + res.ids
    for i, s in enumerate(res.sources):
        ends_vowel = tok.decode(text[:len(ids) + i][-32:])[-1:] in set("aeiou")
        assert (s == "big") == ends_vowel, i
    with pytest.raises(ValueError):
        Entropy(HFBackend(small, "small"), 0.5, pattern="x")   # needs the tokenizer


def test_cascade_levels(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[1]).input_ids
    mk = lambda taus: Cascade([HFBackend(small, "small"), HFBackend(early_exit_view(big, 2), "self:2")], taus)
    assert set(run(big, mk([math.inf, 0.5]), ids, 20).sources) == {"small"}
    assert set(run(big, mk([-math.inf, math.inf]), ids, 20).sources) == {"mid1"}
    low = run(big, mk([-math.inf, -math.inf]), ids, 20)
    assert low.ids == greedy(big, ids, 20) and low.ledger["predictor_calls"] == 0
    mixed = run(big, mk([0.5, 0.6]), ids, 40)
    assert set(mixed.sources) <= {"small", "mid1", "big"} and len(set(mixed.sources)) >= 2
    with pytest.raises(ValueError):
        Cascade([HFBackend(small, "s")], [0.1, 0.2])


def test_gate_skips_while_score_high_and_within_max_skip(tiny):
    tok, big, _ = tiny
    ids = tok(PROMPTS[2]).input_ids
    res = run(big, Gate(FnDrafter(lambda i, h, s: (7, 1.0), threshold=0.5, max_skip=4)), ids, 21)
    # since_big runs 1, 2, 3 -> three skips after each big token
    assert res.sources == (["big"] + ["skip"] * 3) * 5 + ["big"]
    res = run(big, Gate(FnDrafter(lambda i, h, s: (7, 0.4), threshold=0.5)), ids, 10)
    assert set(res.sources) == {"big"}
    res = run(big, Gate(FnDrafter(lambda i, h, s: (7, 0.4), threshold=0.5), threshold=0.3), ids, 10)
    assert "skip" in res.sources                                      # --threshold overrides the drafter's
    res = run(big, Gate(FnDrafter(lambda i, h, s: (7, 1.0), max_skip=8), max_skip=2), ids, 9)
    assert res.sources == ["big", "skip"] * 4 + ["big"]
    # --chain-cut: 0.9, 0.81 >= 0.75 skip; 0.729 stops the run (EAGLE-2's dynamic draft length)
    res = run(big, Gate(FnDrafter(lambda i, h, s: (7, 0.9), max_skip=8), chain_cut=0.75), ids, 9)
    assert res.sources == ["big", "skip", "skip"] * 3


def test_small_lm_drafter_proposes_argmax_with_max_prob(tiny):
    tok, _, small = tiny
    ids = tok(PROMPTS[3]).input_ids
    d = SmallLMDrafter(HFBackend(small, "small"))
    with torch.no_grad():
        p = torch.softmax(small(torch.tensor([ids])).logits[0, -1].float(), -1)
    t, score = d.propose(ids, None, 1)
    assert t == int(p.argmax()) and score == pytest.approx(float(p.max()), abs=1e-5)
    t2, _ = d.propose(ids + [t], None, 2)                  # catch-up of one token
    assert d.lm.backend.n_cached == len(ids) + 1 and isinstance(t2, int)
    assert d.hidden_layer is None


def test_gate_with_small_lm_as_small_policy(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[0]).input_ids
    sb = HFBackend(small, "small")
    res = run(big, Gate.small_lm(sb, 0.9, threshold=-math.inf, name="small"), ids, 20)
    assert res.sources == ["big"] + ["skip"] * 19 and res.ledger["big_calls"] == 1


def test_copy_drafts_the_token_that_followed_the_repeated_suffix(tiny):
    from gate.model.copyrule import CopyIndex
    tok, big, _ = tiny
    ids = tok(" ".join([PROMPTS[5]] * 3)).input_ids
    res = run(big, Copy(min_match=2), ids, 30)
    assert res.ledger["skipped"] > 0
    text = ids + res.ids
    for i, s in enumerate(res.sources):
        if s == "skip":   # the copy rule's candidate on the text before it, with a match of >= 2 tokens
            index = CopyIndex()
            index.sync(text[:len(ids) + i])
            cand, n = index.query()
            assert cand == res.ids[i] and n >= 2


def test_copy_verify_is_lossless(tiny):
    tok, big, _ = tiny
    drafted = 0
    for prompt in PROMPTS:
        ids = tok(" ".join([prompt] * 3)).input_ids
        want = greedy(big, ids, 30)
        for min_match, max_skip in ((1, 11), (2, 4), (4, 11)):
            res = run(big, Copy(min_match, max_skip), ids, 30, verify=True)
            assert res.ids == want, (prompt, min_match)
            drafted += res.ledger["drafted"]
    assert drafted > 0
