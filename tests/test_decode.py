"""The decode loop: catch-up caches, lossless verification, rollback, the ledger, sampling, the CLI.

Most tests use the tiny random LLaMA pair from conftest (re-initialised so that outputs vary with the
context); a few use the real SmolLM2 on short prompts.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from gate.decode.contract import Draft
from gate.decode.cost import CostProfile, Planner
from gate.decode.loop import Decoder, accept_draft, check_output
from gate.decode.policies import BigOnly, Cascade, Copy, Entropy, Gate, Ratio, SmallOnly
from runtimes.hf import HFBackend, early_exit_view

from helpers import PROMPTS, FnDrafter, greedy, ledger_adds_up, lively, paragraph_corpus, save_model


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models: a second intra-op thread is pure overhead (8x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def oracle_fn(big_model, p_right=1.0, score=lambda rng: rng.random()):
    """Proposes the big model's greedy token with probability p_right (else a random one)."""
    oracle, fed = HFBackend(big_model, "oracle"), []

    def fn(ids, hidden, since_big):
        n = 0   # keep the oracle's cache on the common prefix (the text changes after a rollback)
        while n < min(len(fed), len(ids) - 1) and fed[n] == ids[n]:
            n += 1
        oracle.crop(n)
        del fed[n:]
        logits = oracle.forward(ids[n:])[0][-1]
        fed.extend(ids[n:])
        rng = random.Random(hash((len(ids), ids[-1])))
        tok = int(logits.argmax()) if rng.random() < p_right else rng.randrange(logits.shape[-1])
        return tok, score(rng)
    return fn


def kv(backend):
    return [(layer.keys[..., :backend.n_cached, :].clone(), layer.values[..., :backend.n_cached, :].clone())
            for layer in backend.cache.layers]


def assert_same_cache(a, b, atol=1e-4, rtol=1e-4, scale_tol=None):
    """Same positions and K/V tensors; scale_tol compares the largest difference with the largest value
    of each layer's tensor (bf16 rounding accumulates over layers)."""
    assert a.n_cached == b.n_cached
    for (ka, va), (kb, vb) in zip(kv(a), kv(b)):
        for x, y in ((ka.float(), kb.float()), (va.float(), vb.float())):
            if scale_tol is None:
                assert torch.allclose(x, y, atol=atol, rtol=rtol), (x - y).abs().max()
            else:
                assert (x - y).abs().max() <= scale_tol * y.abs().max()


def plain(model, ids):
    """A fresh backend that has read ids in one pass."""
    b = HFBackend(model, "plain")
    b.forward(ids)
    return b


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, tiny_llama_pair):
    big, small = tiny_llama_pair
    return tiny_tokenizer, lively(big, 1), lively(small, 2)


# -- backend ------------------------------------------------------------------------------------------------
def test_catch_up_cache_equals_plain_pass(tiny):
    tok, big, _ = tiny
    ids = tok(PROMPTS[0] + " universally acknowledged, that a single").input_ids
    b = HFBackend(big, "big")
    b.forward(ids[:4])
    b.forward(ids[4:5])
    logits, _ = b.forward(ids[5:])          # catch-up: many tokens at once
    ref = plain(big, ids)
    assert_same_cache(b, ref)
    ref_logits, _ = HFBackend(big, "x").forward(ids)
    assert torch.allclose(logits, ref_logits[5:], atol=1e-4)
    # and the next step agrees
    nxt = int(logits[-1].argmax())
    assert torch.allclose(b.forward([nxt])[0], ref.forward([nxt])[0], atol=1e-4)


def test_crop_then_refeed_equals_plain(tiny):
    tok, big, _ = tiny
    ids = tok(PROMPTS[1] + " said his lady").input_ids
    b = HFBackend(big, "big")
    b.forward(ids + [5, 6, 7])
    b.crop(len(ids) - 2)
    assert b.n_cached == len(ids) - 2 and b.tokens_cropped == 5
    b.forward(ids[-2:])
    assert_same_cache(b, plain(big, ids))
    with pytest.raises(ValueError):
        b.crop(b.n_cached + 1)


def test_hidden_layer_is_hf_numbering(tiny):
    tok, big, _ = tiny
    ids = tok(PROMPTS[2]).input_ids
    with torch.no_grad():
        hs = big(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in (0, 1, len(hs) - 1):
        b = HFBackend(big, "big", hidden_layer=layer)
        _, h = b.forward(ids[:3])
        _, h2 = b.forward(ids[3:], keep=2)
        assert torch.allclose(torch.cat([h, h2])[-2:], hs[layer][0, -2:], atol=1e-5)
        assert torch.allclose(h, hs[layer][0, :3], atol=1e-5)


def test_hidden_layer_tuple_is_concatenation(tiny):
    """hidden_layer=(l1, l2, ...): each row is hidden_states[l1] | hidden_states[l2] | ... (an EAGLE-3 drafter's
    input), through keep, hidden_all, crop and reset; an int still gives hidden_states[l] alone."""
    tok, big, _ = tiny
    ids = tok(PROMPTS[2]).input_ids
    with torch.no_grad():
        hs = big(torch.tensor([ids]), output_hidden_states=True).hidden_states
    layers = (3, 0, 2)   # any order, the last (post-norm) included
    want = torch.cat([hs[i][0] for i in layers], -1)
    b = HFBackend(big, "big", hidden_layer=list(layers))
    assert b.hidden_layer == layers
    _, h = b.forward(ids[:4])
    _, h2 = b.forward(ids[4:], keep=2)
    assert h.shape == (4, 3 * b.hidden_size) and h2.shape == (2, 3 * b.hidden_size)
    assert torch.allclose(h, want[:4], atol=1e-5) and torch.allclose(h2, want[-2:], atol=1e-5)
    b.hidden_all = True
    b.crop(3)
    _, h3 = b.forward(ids[3:], keep=1)
    assert torch.allclose(h3, want[3:], atol=1e-5)
    b.reset()
    b.hidden_all = False
    assert torch.allclose(b.forward(ids, keep=1)[1], want[-1:], atol=1e-5)
    b.hidden_layer = 2
    b.reset()
    h = b.forward(ids, keep=1)[1]
    assert h.shape == (1, b.hidden_size) and torch.allclose(h, hs[2][0, -1:], atol=1e-5)
    for bad in ((), (0, 4), -1):
        with pytest.raises(ValueError):
            b.hidden_layer = bad


def test_early_exit_view_shares_weights(tiny):
    tok, big, _ = tiny
    v = early_exit_view(big, 1)
    assert len(v.model.layers) == 1 and len(big.model.layers) == 3
    assert v.lm_head.weight.data_ptr() == big.lm_head.weight.data_ptr()
    ids = tok(PROMPTS[0]).input_ids
    with torch.no_grad():
        hs = big(torch.tensor([ids]), output_hidden_states=True).hidden_states
        want = big.lm_head(big.model.norm(hs[1]))[0]
    got, _ = HFBackend(v, "self:1").forward(ids)
    assert torch.allclose(got, want, atol=1e-4)


# -- lossless verification -------------------------------------------------------------------------------------
def gates(big, small):
    """Gate policies over drafters of different quality, by drafter threshold."""
    n_vocab = big.lm_head.weight.shape[0]
    small_b = HFBackend(small, "small")
    return {
        # the small model's argmax with a fake score: mostly wrong, rollbacks everywhere
        "small-argmax": lambda th: Gate.small_lm(small_b, th),
        # noisy oracle: right 70% of the time, scores unrelated to correctness
        "noisy-oracle": lambda th: Gate(FnDrafter(oracle_fn(big, 0.7), threshold=th, max_skip=6)),
        # random tokens with score 1.0: skips everything it is allowed to
        "random-skip-all": lambda th: Gate(FnDrafter(
            lambda ids, h, s: (random.Random(len(ids)).randrange(n_vocab), 1.0), threshold=th, max_skip=50)),
        # score 0: skips nothing
        "skip-none": lambda th: Gate(FnDrafter(lambda ids, h, s: (0, 0.0), threshold=th)),
    }


@pytest.mark.parametrize("name", ["small-argmax", "noisy-oracle", "random-skip-all", "skip-none"])
def test_gate_verify_is_lossless(tiny, name):
    tok, big, small = tiny
    make = gates(big, small)[name]
    bb = HFBackend(big, "big")
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        want = greedy(big, ids, 24)
        for th in (0.0, 0.3, 0.7, 1.0):
            res = Decoder(bb, make(th), verify=True).generate(ids, 24)
            assert res.ids == want, (name, prompt, th)
            ledger_adds_up(res, bb)


class CappedBackend(HFBackend):
    """An HF backend that says passes over 3 tokens are not exact (as llama.cpp's K-quant kernels do) and records
    the length of every pass."""
    exact_pass = 3

    def forward(self, tokens, keep=None, copy=True):
        self.lengths.append(len(tokens))
        return super().forward(tokens, keep, copy)


@pytest.mark.parametrize("planned", [False, True])
def test_lossless_verify_keeps_passes_within_the_exact_length(tiny, planned):
    """Under a lossless --verify no pass after the prompt is longer than the backend's exact_pass (a longer one
    would round differently from one-token steps), planned or not, however many drafts the policy offers; lossy
    decoding is not capped."""
    tok, big, _ = tiny
    ids = tok(PROMPTS[0]).input_ids
    bb = CappedBackend(big, "big")
    skip_all = Gate(FnDrafter(oracle_fn(big, 1.0, score=lambda rng: 1.0), threshold=0.5, max_skip=12))
    planner = Planner(CostProfile({}, 10.0, [1, 2, 3, 4], [1.0, 1.1, 1.2, 1.3])) if planned else None
    bb.lengths = []
    res = Decoder(bb, skip_all, verify=True, planner=planner).generate(ids, 30)
    assert res.ids == greedy(big, ids, 30)
    assert bb.lengths[0] == len(ids) and max(bb.lengths[1:]) == 3 and res.ledger["skipped"] > 0
    bb.lengths = []
    Decoder(bb, skip_all).generate(ids, 30)
    assert max(bb.lengths[1:]) > 3


def test_skip_all_and_skip_none_extremes(tiny):
    tok, big, small = tiny
    ids = tok(PROMPTS[0]).input_ids
    g = gates(big, small)
    bb = HFBackend(big, "big")
    res = Decoder(bb, g["random-skip-all"](0.5)).generate(ids, 30)
    assert res.ledger["big_calls"] == 1 and res.ledger["skipped"] == 29   # prefill + its one token
    res = Decoder(bb, g["random-skip-all"](0.5), verify=True).generate(ids, 30)
    assert res.ledger["rollbacks"] > 0 and res.ids == greedy(big, ids, 30)
    res = Decoder(bb, g["skip-none"](0.5)).generate(ids, 30)
    assert res.ledger["skipped"] == 0 and res.ledger["big_calls"] == 30
    assert res.ledger["predictor_calls"] == 29


@pytest.mark.parametrize("policy", ["ratio", "entropy", "entropy-lookahead", "small", "cascade"])
def test_two_model_policies_verify_is_lossless(tiny, policy):
    tok, big, small = tiny
    bb, sb = HFBackend(big, "big"), HFBackend(small, "small")
    mid = HFBackend(early_exit_view(big, 2), "self:2")
    make = {"ratio": lambda: Ratio(sb, 0.5, 2),
            "entropy": lambda: Entropy(sb, 0.5),
            "entropy-lookahead": lambda: Entropy(sb, 0.6, lookahead=3),
            "small": lambda: SmallOnly(sb),
            "cascade": lambda: Cascade([sb, mid], [0.5, 0.7])}[policy]
    for prompt in PROMPTS[:4]:
        ids = tok(prompt).input_ids
        res = Decoder(bb, make(), verify=True).generate(ids, 20)
        assert res.ids == greedy(big, ids, 20), (policy, prompt)
        ledger_adds_up(res, bb)


def test_verify_below_is_the_dial(tiny):
    tok, big, _ = tiny
    right = oracle_fn(big, 1.0, score=lambda rng: 0.5)
    wrong = oracle_fn(big, 0.0, score=lambda rng: 0.95)

    def fn(ids, h, s):   # every other proposal is a confident wrong one
        return (wrong if len(ids) % 2 else right)(ids, h, s)
    ids = tok(PROMPTS[3]).input_ids
    want = greedy(big, ids, 24)
    bb = HFBackend(big, "big")
    run = lambda **kw: Decoder(bb, Gate(FnDrafter(fn, threshold=0.4)), **kw).generate(ids, 24)
    lossy = run()
    assert lossy.ids != want and lossy.ledger["rollbacks"] == 0
    below = run(verify=True, verify_below=0.9)     # checks only the 0.5 proposals: they are all right
    assert below.ledger["rollbacks"] == 0 and below.ledger["verified"] > 0 and below.ids != want
    full = run(verify=True)
    assert full.ids == want and full.ledger["rollbacks"] > 0


def test_caches_consistent_after_rollbacks(tiny):
    tok, big, small = tiny
    bb, sb = HFBackend(big, "big"), HFBackend(small, "small")
    ids = tok(PROMPTS[4]).input_ids
    res = Decoder(bb, Gate.small_lm(sb, 0.0), verify=True).generate(ids, 25)
    assert res.ledger["rollbacks"] > 5
    text = ids + res.ids
    assert_same_cache(bb, plain(big, text[:bb.n_cached]))
    assert_same_cache(sb, plain(small, text[:sb.n_cached]))


def test_drafter_gets_hidden_state_of_last_big_position(tiny):
    tok, big, _ = tiny
    ids = tok(PROMPTS[5]).input_ids
    d = FnDrafter(oracle_fn(big, 0.8), threshold=0.3, max_skip=4, hidden_layer=2)
    res = Decoder(HFBackend(big, "big"), Gate(d), verify=True).generate(ids, 20)
    text = ids + res.ids
    with torch.no_grad():
        hs = big(torch.tensor([text]), output_hidden_states=True).hidden_states[2][0]
    assert d.seen
    for seen_ids, hidden, since_big in d.seen:
        assert 1 <= since_big < 4
        p = len(seen_ids) - 1 - since_big       # the big model's last computed position
        if seen_ids[:p + 1] == text[:p + 1]:   # (proposals made before a rollback saw other text)
            assert torch.allclose(hidden, hs[p], atol=1e-4)


# -- ledger, EOS, sampling ------------------------------------------------------------------------------------
def test_ledger_counts_lossy_runs(tiny):
    tok, big, small = tiny
    bb, sb = HFBackend(big, "big"), HFBackend(small, "small")
    ids = tok(PROMPTS[0]).input_ids
    for pol in (BigOnly(), Ratio(sb, 0.5, 3), Entropy(sb, 0.5, span=2), SmallOnly(sb),
                Gate(FnDrafter(oracle_fn(big, 0.9), threshold=0.2, max_skip=3))):
        res = Decoder(bb, pol).generate(ids, 30)
        ledger_adds_up(res, bb)
        led = res.ledger
        if pol.name == "big":
            assert led["big_calls"] == 30 and led["big_tokens_fed"] == len(ids) + 29
        if pol.name == "small":
            assert led["big_calls"] == 0 and led["skipped"] == 30
            assert led["predictor_calls"] == 30 and led["models"]["small"]["tokens_fed"] == len(ids) + 29
        if pol.name == "gate":   # catch-up: the big model has read every token before its last one
            last_big = max(i for i, s in enumerate(res.sources) if s == "big")
            assert bb.n_cached == led["big_tokens_fed"] == len(ids) + last_big
            assert led["big_calls"] == led["big_emitted"]


def test_check_output(tiny):
    tok, big, small = tiny
    bb = HFBackend(big, "big")
    ids = tok(PROMPTS[1]).input_ids
    res = Decoder(bb, BigOnly()).generate(ids, 15)
    chk = check_output(bb, ids, res.ids)
    assert chk["on_policy_error"] == 0 and chk["checked"] == 15 and chk["nll"] > 0
    bad = check_output(bb, ids, [(t + 1) % 300 for t in res.ids])
    assert bad["on_policy_error"] == 1.0 and bad["nll"] > chk["nll"]


def test_eos_stops_and_is_verified(tiny):
    tok, big, _ = tiny
    eos = tok.eos_token_id
    ids = tok(PROMPTS[2]).input_ids
    bb = HFBackend(big, "big")
    gate = lambda: Gate(FnDrafter(lambda i, h, s: (eos, 1.0), threshold=0.5))
    res = Decoder(bb, gate(), eos_ids=[eos]).generate(ids, 20)
    assert res.ids[-1] == eos and len(res.ids) == 2       # big token, then the skipped EOS
    assert res.ledger["stopped"] == "eos"
    res = Decoder(bb, gate(), eos_ids=[eos], verify=True).generate(ids, 20)
    assert res.ids == greedy(big, ids, 20, [eos])          # the EOS was checked and refused


def test_speculative_sampling_rule_gives_big_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=g) * 2
    q = torch.softmax(logits / 0.8, -1)
    p = torch.softmax(torch.randn(6, generator=g), -1)
    for probs in (None, p):
        counts = torch.zeros(6)
        for i in range(8000):
            x = 2 if probs is None else int(torch.multinomial(probs, 1, generator=g))
            ok, tok = accept_draft(logits, Draft(x, "small", 1.0, probs), 0.8, g)
            counts[tok] += 1
        assert (counts / counts.sum() - q).abs().sum() < 0.05


def test_sampling_is_seeded_and_verify_keeps_counts(tiny):
    tok, big, small = tiny
    bb, sb = HFBackend(big, "big"), HFBackend(small, "small")
    ids = tok(PROMPTS[3]).input_ids
    a = Decoder(bb, Entropy(sb, 0.6), temperature=0.9, seed=3).generate(ids, 20)
    b = Decoder(bb, Entropy(sb, 0.6), temperature=0.9, seed=3).generate(ids, 20)
    c = Decoder(bb, Entropy(sb, 0.6), temperature=0.9, seed=4).generate(ids, 20)
    assert a.ids == b.ids and a.ids != c.ids
    for pol in (Entropy(sb, 0.6), Gate.small_lm(sb, 0.0)):
        res = Decoder(bb, pol, temperature=0.9, seed=1, verify=True).generate(ids, 20)
        ledger_adds_up(res, bb)


def test_empty_prompt_refused(tiny):
    _, big, _ = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        Decoder(HFBackend(big, "big"), BigOnly()).generate([], 5)


# -- real SmolLM2 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_bf16():
    from runtimes.loading import load
    return load("smollm2-135m", dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_catch_up_cache_equals_plain_pass(smollm2, dtype, request):
    lm = smollm2 if dtype == "float32" else request.getfixturevalue("smol_bf16")
    m, tok = lm.model, lm.tokenizer
    ids = tok("It is a truth universally acknowledged, that a single man").input_ids
    b = HFBackend(m, "big")
    b.forward(ids[:5])
    b.forward(ids[5:6])
    logits, _ = b.forward(ids[6:])
    ref = plain(m, ids)
    # bf16: batched and one-token passes round differently; the differences grow over the 30 layers to
    # ~3% of a layer's largest value (measured), far below anything that changes a greedy token
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == "float32" else dict(scale_tol=0.05)
    assert_same_cache(b, ref, **tol)
    ref_logits, _ = HFBackend(m, "x").forward(ids)
    # next-token distribution (bf16 logits can shift as a whole by ~0.6, which softmax ignores)
    a, r = torch.log_softmax(logits[-1], -1), torch.log_softmax(ref_logits[-1], -1)
    top = r.topk(10).indices
    assert (a[top] - r[top]).abs().max() < (1e-3 if dtype == "float32" else 0.5)
    assert int(a.argmax()) == int(r.argmax())


@pytest.mark.parametrize("prompt", ["It is a truth universally acknowledged, that a single man",
                                    "The carriage stopped at the door, and"])
def test_smollm2_verify_is_lossless(smollm2, prompt):
    """float32 (the smollm2 fixture): in bf16 a batched and a one-token pass can break logit ties differently
    (bf16 logits near 25 are spaced 0.125 apart), which says nothing about the loop."""
    m, tok = smollm2.model, smollm2.tokenizer
    ids = tok(prompt).input_ids
    bb, sb = HFBackend(m, "big"), HFBackend(early_exit_view(m, 20), "self:20")
    want = Decoder(bb, BigOnly()).generate(ids, 12).ids
    for pol in (Gate.small_lm(sb, 0.3), Ratio(sb, 0.5, 2)):
        res = Decoder(bb, pol, verify=True).generate(ids, 12)
        assert res.ids == want, pol.name
        ledger_adds_up(res, bb)


def test_smollm2_planned_verify_is_lossless(smollm2):
    """The default lossless decode (chains sized by the planner) on transformers: greedy big's tokens, with a
    cost curve that makes long chains look cheap (so rollbacks happen) and with a linear one (no drafts)."""
    from gate.decode.cost import CostProfile, Planner

    m, tok = smollm2.model, smollm2.tokenizer
    ids = tok("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
              "in want of a wife. It is a truth universally acknowledged").input_ids
    bb, sb = HFBackend(m, "big"), HFBackend(early_exit_view(m, 20), "self:20")
    want = Decoder(bb, BigOnly()).generate(ids, 24).ids
    ks = list(range(1, 34))
    for curve in ([1 + 0.05 * (k - 1) for k in ks], [float(k) for k in ks]):
        for pol in (Copy(min_match=1, max_skip=33), Gate.small_lm(sb, threshold=-1.0)):
            plan = Planner(CostProfile({}, 10.0, ks, curve), pol.acceptance())
            res = Decoder(bb, pol, verify=True, planner=plan).generate(ids, 24)
            assert res.ids == want, pol.name
            assert (plan.stats["kept"] == 0) == (curve[-1] == 33.0)


# -- CLI -----------------------------------------------------------------------------------------------------------
def test_cli_json_and_ledger(smollm2, tmp_path, capsys):
    from gate.decode.cli import main
    out = tmp_path / "r.json"
    rc = main(["It is a truth universally acknowledged", "-m", "6", "--policy", "ratio", "--small", "self:10",
               "--min-tokens", "2", "--json", str(out), "--check", "--no-color"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["prompt"].startswith("It is a truth") and len(r["output_ids"]) == 6
    assert r["sources"] == ["scaffold", "scaffold", "small", "big", "small", "big"]
    assert r["ledger"]["skipped"] == 2 and "on_policy_error" in r["ledger"]["check"]
    assert r["text"] == smollm2.tokenizer.decode(r["output_ids"], skip_special_tokens=True)
    cap = capsys.readouterr()
    assert "\033[" not in cap.out and r["text"] in cap.out and "big calls" in cap.err


def test_cli_refuses_other_tokenizer(smollm2, tiny, tmp_path, capsys):
    from gate.decode.cli import main
    tok, _, small = tiny
    save_model(tmp_path / "tiny", small, tok)
    rc = main(["Hello", "-m", "2", "--policy", "entropy", "--small", str(tmp_path / "tiny"), "--dtype", "float32"])
    assert rc == 2
    assert "do not share a tokenizer" in capsys.readouterr().err


@pytest.mark.real_model   # the policy is checked after the model is opened
def test_cli_user_errors(capsys):
    from gate.decode.cli import main
    assert main(["x", "--policy", "entropy"]) == 2
    assert "needs --small" in capsys.readouterr().err
    assert main(["x", "--policy", "ratio", "--small", "self:4", "-r", "2"]) == 2
    assert "ratio must be in [0, 1]" in capsys.readouterr().err


def fake_corpus(path):
    para = "She was a fine woman, and she knew it well; the neighbourhood knew it better. " * 6
    return paragraph_corpus(path, ["train", "test", "test"], lambda i: [para] * 30)


def test_held_out_prompts(tmp_path, smollm2):
    from gate.decode.session import held_out_prompts
    ps = held_out_prompts(str(fake_corpus(tmp_path)), smollm2.tokenizer, 3, 20)
    assert len(ps) == 3 and all(len(p) == 20 for p in ps)


def test_cli_demo_side_by_side(tmp_path, smollm2, capsys):
    from gate.decode.cli import main
    corpus = fake_corpus(tmp_path / "corpus")
    rc = main(["--demo", "--corpus", str(corpus), "--small", "self:10", "-m", "3", "--n-prompts", "1",
               "--prompt-tokens", "12", "--json", str(tmp_path / "d.json")])
    assert rc == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("ledger"))
    assert header.split() == ["ledger", "big", "copy+verify", "gate", "gate+verify"]
    assert "on-policy error" in out and "x big" in out
    runs = json.loads((tmp_path / "d.json").read_text())["runs"]
    assert [r["ledger"]["verify"] for r in runs] == [False, True, False, True]
    for lossless in (runs[1], runs[3]):
        assert lossless["output_ids"] == runs[0]["output_ids"] or lossless["ledger"]["check"]["beyond_ties"] == 0
