"""The feature head (EAGLE-3's layout): its training levels equal step-by-step chain drafting with its KV cache
(the batch-1 path), in float32 and in its int8 copy; training lowers its loss and resumes; the artifact refuses
another model; decoding with it is lossless."""
import json

import pytest
import torch

from gate.model.eagle import (ChainCache, FeatureHead, candidate_features, candidate_rows, int8_head,
                              level_mask)


def tiny_head(seed=0, V=50, D=16, K=20, kv=1):
    torch.manual_seed(seed)
    head = FeatureHead(V, D, K, layers=(0, 1, 2), n_heads=2, n_kv_heads=kv, mlp=24)
    head.embed.normal_()
    head.draft_ids.copy_(torch.arange(K))
    head.feat_scale.uniform_(0.5, 2.0)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


def test_level_mask_reads_the_chain_and_the_true_entries_before_it():
    m = level_mask(5, 3)                      # level 3, query at i = 4: anchor 2
    assert m[4, :5].tolist() == [True, True, True, False, False]
    assert m[4, 5:10].tolist() == [False, False, False, True, False]   # level 2 at i-1
    assert m[4, 10:].tolist() == [False, False, False, False, True]    # itself
    assert m[0].sum() == 1 and m[0, 10]       # no anchor: its own key only


def chain_vs_levels(head, L=9, depth=3, seed=0):
    """The cache's step-by-step logits and the training levels' logits at every (depth, position)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, L, 3 * head.hidden_size, generator=g)
    toks = torch.randint(0, head.vocab_size, (L + 1,), generator=g)
    with torch.no_grad():
        outs = head(h, toks[1:][None], depth=depth)
    cache, got, want = ChainCache(head), [], []
    for d in range(1, depth + 1):
        for i in range(d - 1, L):
            big_cached = i - d + 2            # true entries 0 .. i-d+1, chain entries after
            got.append(cache.draft(toks[:i + 2].tolist(), h[0, :big_cached]))
            with torch.no_grad():
                want.append(head.logits(outs[d - 1][0, i]))
    return torch.stack(got), torch.stack(want)


@pytest.mark.parametrize("kv", [1, 2])
def test_levels_equal_chain_drafting_with_the_cache(kv):
    """The batch-1 path (one entry a step, grown buffers, no mask) computes the training levels' numbers, with
    grouped key/value heads (kv=1) and without."""
    got, want = chain_vs_levels(tiny_head(kv=kv))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_int8_copy_drafts_what_the_float_head_drafts():
    """The decode path's int8 copy: the same top token as float32 almost everywhere, logits within a small part
    of their spread (activations are quantised per call, so its batch and its steps differ a little too)."""
    head = tiny_head(2, V=300, D=64, K=200)
    fast = int8_head(head)
    if fast is None:
        pytest.skip("this torch has no int8 linear kernels (the drafter then runs in float32)")
    got, want = chain_vs_levels(fast, L=20)
    _, ref = chain_vs_levels(head, L=20)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    for a, b in ((got, ref), (got, want)):
        err = (a - b).abs().max(-1).values / b.std(-1)
        assert err.median() < 0.15 and err.max() < 0.3, err


def test_cache_keeps_and_crops_entries_like_a_fresh_one():
    head = tiny_head(1)
    h = torch.randn(12, 48)
    toks = torch.randint(0, 50, (14,)).tolist()
    cache = ChainCache(head)
    cache.draft(toks[:10], h[:6])             # 6 true + 3 chain entries
    cache.draft(toks[:11], h[:6])             # one more chain entry, nothing recomputed before it
    assert cache.steps == 10
    changed = toks[:8] + [(toks[8] + 1) % 50] + toks[9:12]
    got = cache.draft(changed, h[:8])         # a rollback at 8 and new true rows
    want = ChainCache(head).draft(changed, h[:8])
    assert torch.allclose(got, want, atol=1e-5)


def split_data(book, pos, D=16, V=50, seed=0):
    import numpy as np

    from gate.model.heads import run_starts
    from gate.train.data import SplitData

    rng = np.random.default_rng(seed)
    n = len(book)
    book, pos = np.asarray(book), np.asarray(pos)
    return SplitData("train", rng.integers(0, V, n), rng.integers(0, V, n), rng.integers(0, V, n), book, pos,
                     rng.normal(size=(n, D)).astype(np.float16), run_starts(book, pos), None, None, None, None, [])


def test_eval_windows_stay_inside_runs_and_rows():
    import numpy as np

    from gate.train.eagle import eval_windows, window_starts

    d = split_data([0] * 10 + [1] * 7, list(range(10)) + list(range(7)))
    w = eval_windows(d, 4)
    spans = sorted((int(s), L) for L, st in w.items() for s in st)
    assert spans == [(0, 4), (4, 4), (8, 1), (10, 4), (14, 2)]      # predictions for every row but run starts
    rows = np.r_[0:6, 10:17]
    assert sorted((int(s), L) for L, st in eval_windows(d, 8, rows).items() for s in st) == [(0, 5), (10, 6)]
    assert window_starts(d, 4).tolist() == [0, 4, 10]
    assert window_starts(d, 4, rows=rows).tolist() == [0, 10]


# ------------------------------------------------------------------------------------------------ fit + decode
from helpers import (  # noqa: E402
    assert_one_error_line,
    book_text,
    call_main,
    make_tiny_llama,
    make_tiny_tokenizer,
    save_model,
    split_records,
    write_corpus,
)

EAGLE_FIT = dict(drafter="eagle", eagle_layers="0,1,2", eagle_vocab=64, eagle_window=16, eagle_batch=8, eagle_depth=3, eagle_epochs=4.0,
                 eagle_lr=3e-3, dtype="float32", threads=1)


@pytest.fixture(scope="module")
def tiny_eagle(tmp_path_factory, tiny_llama, tiny_tokenizer):
    from gate.train.fit import fit

    root = tmp_path_factory.mktemp("eagle")
    model_dir, _, records = split_records(root, tiny_llama, tiny_tokenizer, ("0", "1", "2"))
    logs = []
    fit(records, root / "eagle", log=logs.append, **EAGLE_FIT)
    return model_dir, records, root / "eagle", logs


def test_training_lowers_the_loss_and_resumes(tiny_eagle, tmp_path):
    from gate.train.fit import fit

    model_dir, records, out, logs = tiny_eagle
    meta = json.loads((out / "drafter.json").read_text())
    first, last = meta["timings"]["head"]["first_losses"], meta["timings"]["head"]["last_losses"]
    assert last["ce1"] < 0.75 * first["ce1"] and last["ce2"] < first["ce2"]
    assert meta["max_skip"] == EAGLE_FIT["eagle_depth"] + 1 and meta["format"] == "skipgate-eagle/2"
    assert meta["cost"]["head_flops_per_token"] < meta["cost"]["big_flops_per_token"] * 10
    # a re-run with the same settings loads the finished head instead of training it again
    again = []
    fit(records, out, log=again.append, **EAGLE_FIT)
    assert any("loaded finished stage" in m for m in again)


def test_artifact_refuses_another_tokenizer_or_hidden_size(tiny_eagle, tmp_path):
    from gate.model.load import ArtifactError, load_drafter
    from runtimes.info import TokenizerMismatch
    from runtimes.loading import load

    model_dir, _, out, _ = tiny_eagle
    info = load(model_dir, dtype="float32").info
    dr = load_drafter(out, info)
    assert dr.reads_all_hidden and dr.hidden_layer == (0, 1, 2)
    other = save_model(tmp_path / "other", make_tiny_llama(300), make_tiny_tokenizer(280))
    with pytest.raises(TokenizerMismatch):
        load_drafter(out, load(other, dtype="float32").info)
    with pytest.raises(ArtifactError, match="hidden_size"):
        load_drafter(out, {**info.to_dict(), "hidden_size": info.hidden_size * 2})


def lossless_against_greedy(model, drafter, prompts, n_new=24):
    from gate.decode.loop import Decoder
    from gate.decode.policies import BigOnly, Gate
    from runtimes.hf import HFBackend

    for ids in prompts:
        want = Decoder(HFBackend(model, "big"), BigOnly()).generate(ids, n_new).ids
        for th in (0.0, drafter.threshold):
            res = Decoder(HFBackend(model, "big"), Gate(drafter, threshold=th), verify=True).generate(ids, n_new)
            assert res.ids == want, th
            if th == 0.0:       # every draft step proposed something and every one was checked or dropped
                L = res.ledger
                assert L["drafted"] > 0
                assert L["drafted"] == L["verified"] + L["rolled_back_tokens"] - L["rollbacks"]


def test_tiny_eagle_decode_is_lossless(tiny_eagle, tiny_llama, tiny_tokenizer):
    from gate.model.load import load_drafter

    dr = load_drafter(tiny_eagle[2], None)
    prompts = [tiny_tokenizer(book_text(3, 1)[:200])["input_ids"][:40], [5, 9, 5, 9, 5, 9, 5]]
    lossless_against_greedy(tiny_llama, dr, prompts)


def test_sampled_decode_with_the_feature_head_keeps_the_big_models_distribution(tiny_eagle, tiny_llama):
    """Speculative sampling with the feature head's sampled drafts: the big model speaks first (token 0), the
    head drafts token 1 from its own distribution, verification accepts it with min(1, q/p). Token 1 of each run
    must be distributed as the big model's softmax(logits / T) after that run's token 0: the counts of each
    token over the runs match the sum of those conditional probabilities (within 4 standard deviations)."""
    from gate.decode.loop import Decoder
    from gate.decode.policies import Gate
    from gate.model.load import load_drafter
    from runtimes.hf import HFBackend

    dr = load_drafter(tiny_eagle[2], None)
    ids, T, n = [5, 9, 5, 9, 5, 9, 5], 0.7, 600
    cond: dict[int, torch.Tensor] = {}
    counts = expected = variance = None
    drafted = 0
    for seed in range(n):
        res = Decoder(HFBackend(tiny_llama, "big"), Gate(dr, threshold=0.0), verify=True, temperature=T,
                      seed=seed).generate(ids, 2)
        drafted += res.ledger["drafted"]
        t0, t1 = res.ids
        if t0 not in cond:
            with torch.no_grad():
                cond[t0] = torch.softmax(tiny_llama(torch.tensor([ids + [t0]])).logits[0, -1] / T, -1)
        q = cond[t0]
        if counts is None:
            counts, expected, variance = torch.zeros_like(q), torch.zeros_like(q), torch.zeros_like(q)
        counts[t1] += 1
        expected += q
        variance += q * (1 - q)
    assert drafted > n // 2                       # the head drafted token 1 in most runs
    top = expected.topk(5).indices
    assert ((counts[top] - expected[top]).abs() < 4 * variance[top].sqrt() + 3).all(), (counts[top], expected[top])


# ------------------------------------------------------------------------------------------------ real SmolLM2
AUSTEN = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
          "want of a wife. However little known the feelings or views of such a man may be on his first entering "
          "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
          "considered the rightful property of some one or other of their daughters.")


@pytest.fixture(scope="module")
def smollm2_eagle(smollm2, tmp_path_factory):
    """A feature head fitted on a few hundred real SmolLM2 positions (weak, but real: the decode checks below
    hold for any head)."""
    from corpus_tools import record as rec_mod
    from gate.train.fit import fit

    root = tmp_path_factory.mktemp("eagle_smollm2")
    texts = [AUSTEN, AUSTEN[120:] + " " + AUSTEN[:120]]
    corpus = write_corpus(root / "corpus", [("pp", "train", "\n\n".join(texts * 3)), ("va", "val", texts[1]),
                                            ("te", "test", texts[0])])
    rec_mod.record(["smollm2-135m"], corpus, root / "records", layers=("eagle3",), context=128, stride=96,
                   max_tokens_per_book=400, shard_tokens=1000, progress=False)
    fit(root / "records", root / "eagle", log=lambda m: None,
        **{**EAGLE_FIT, "eagle_layers": "eagle3", "eagle_vocab": 512, "eagle_epochs": 2.0})
    return root / "eagle"


def test_smollm2_eagle_decode_is_lossless(smollm2, smollm2_eagle):
    from gate.model.load import load_drafter

    dr = load_drafter(smollm2_eagle, smollm2.info)
    ids = smollm2.tokenizer(AUSTEN[:150], add_special_tokens=False).input_ids
    lossless_against_greedy(smollm2.model, dr, [ids], n_new=16)


def test_smollm2_eagle_on_llamacpp_is_lossless(smollm2, smollm2_eagle):
    """The same drafter on the llama.cpp backend (the inputs of blocks 2, 15 and 27) with --verify == big there."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make venv` builds it)")
    from gate.decode.loop import Decoder
    from gate.decode.policies import BigOnly, Gate
    from gate.model.load import load_drafter
    from runtimes.llamacpp import LlamaCppBackend
    from runtimes.sources import packaged_gguf

    dr = load_drafter(smollm2_eagle, smollm2.info)
    big = LlamaCppBackend(str(packaged_gguf("smollm2-135m")[0]), name="smollm2-135m", n_ctx=256, n_threads=1)
    try:
        ids = smollm2.tokenizer(AUSTEN[:150], add_special_tokens=False).input_ids
        want = Decoder(big, BigOnly()).generate(ids, 16).ids
        res = Decoder(big, Gate(dr, threshold=0.0), verify=True).generate(ids, 16)
        assert res.ids == want and res.ledger["drafted"] > 0 and res.ledger["draft_steps"] > 0
    finally:
        big.close()


def test_evaluate_reports_the_head_beside_the_copy_rule_and_tau(tiny_eagle, tmp_path):
    """train.py evaluate on a feature head: agreement, coverage beside the copy rule and the oracle, tau(k) for
    k = 1 .. depth, non-decreasing in k and at most k + 1, the oracle's at least the head's."""
    import train

    _, records, out, _ = tiny_eagle
    rc, err = call_main(train.main, ["evaluate", "--records", records, "--gate", out, "--out", tmp_path / "e"])
    assert rc == 0, err[-2000:]
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    taus = [m["all"]["chains"]["by_k"][str(k)] for k in range(1, EAGLE_FIT["eagle_depth"] + 1)]
    for k, t in enumerate(taus, 1):
        assert 1 <= t["head_tau"] <= t["oracle_tau"] <= k + 1 and 1 <= t["copy_tau"] <= t["oracle_tau"]
    assert all(a["head_tau"] <= b["head_tau"] for a, b in zip(taus, taus[1:]))
    assert 0 <= m["all"]["first_token_agreement"] <= 1 and m["non_copy"]["pairs"] + m["copy_positions"]["pairs"] \
        == m["all"]["pairs"]
    assert "tau(k)" in (tmp_path / "e" / "report.md").read_text()


def test_cli_errors_name_the_problem(tiny_eagle, tmp_path):
    import train

    _, records, out, _ = tiny_eagle
    rc, err = call_main(train.main, ["fit", "--records", records, records, "--out", tmp_path / "g"])
    assert_one_error_line(rc, err, "--drafter eagle reads several", start="train.py fit: error: ")


def test_eagle_scores_through_precision_maps_and_calibrate_rewrites_only_them(tiny_eagle, tmp_path):
    """Issue 19: the feature head's gate and the copy rule on one score scale (maps in drafter.json, monotone and
    bounded); train.py calibrate refits maps and threshold, its tensors byte for byte, refusing its training
    books."""
    from test_precision_maps import calibrate_cli, check_maps, files_sha

    from gate.model.load import load_drafter

    _, records, out, _ = tiny_eagle
    dr = load_drafter(out, None)
    assert dr.extend == 64 and dr.maps.max_n == 12
    check_maps(dr.maps)
    meta = json.loads((out / "drafter.json").read_text())
    assert set(meta["precision_maps"]["gates"]) == {"gate"} and meta["precision_maps"]["fitted_on"]["pairs"] > 0
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 2
    hid = torch.zeros(len(ids) - 1, 3 * dr.head.hidden_size)
    assert 0 < dr.propose(ids, hid, 1)[1] < 1
    rc, err = calibrate_cli(records, out, tmp_path / "new", "--split", "test")
    assert rc == 0 and "pairs: " in err and ("of the oracle" in err or "skip nothing here" in err), err[-2000:]
    new = json.loads((tmp_path / "new" / "drafter.json").read_text())
    assert new["recalibrated"]["split"] == "test" and new["calibration"]["gate"]["threshold"] == new["threshold"]
    assert files_sha(tmp_path / "new") == files_sha(out) and list(files_sha(out)) == ["eagle.safetensors"]
    check_maps(load_drafter(tmp_path / "new", None).maps)
    rc, err = calibrate_cli(records, out, tmp_path / "t", "--split", "train")
    assert rc == 2 and "was trained on" in err



def test_a_sure_copy_is_proposed_without_running_the_head(tiny_eagle):
    """Free sources first: where the copy rule's estimate alone beats the best the gate's map can give, propose
    takes the copy and the head computes nothing; otherwise the head runs."""
    from gate.model.load import load_drafter

    dr = load_drafter(tiny_eagle[2], None)
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 2 + [5, 6, 7]
    hid = torch.randn(len(ids) - 1, 3 * dr.head.hidden_size)
    alone = dr.propose_free(ids)
    assert alone is not None and alone[0] == 8
    dr.start()
    dr.gate_ceiling = alone[1]                          # the copy's estimate reaches the gate's best
    assert dr.propose(ids, hid, 1) == (8, alone[1]) and dr.steps == 0 and dr.last_logits is None
    dr.start()
    dr.gate_ceiling = alone[1] + 1e-3                   # the gate could outbid it: the head is asked
    dr.propose(ids, hid, 1)
    assert dr.steps == len(hid)


@pytest.mark.parametrize("spec, want", [("eagle3", [2, 15, 27]), ("2,middle,-3", [2, 15, 27]), ("last,0,10", [0, 10, 30]),
                                        ("1,2", None), ("2,2,3", None), ("2,15,31", None), ("a,b,c", None)])
def test_eagle_layers_name_three_distinct_layers(spec, want):
    from gate.train.data import FitError
    from gate.train.fit import eagle_layer_spec

    if want is None:
        with pytest.raises(FitError, match="--eagle-layers"):
            eagle_layer_spec(spec, 30)
    else:
        assert eagle_layer_spec(spec, 30) == want


def test_one_proposals_feature_rows_equal_the_batched_features():
    """The decode path's candidate_rows (Python floats, one proposal) gives the fit's candidate_features: the same
    candidates, validity and gate features, over agreeing, differing and missing copies, depths and classes."""
    import numpy as np
    from corpus_tools.inventory import CLASSES

    rng = np.random.default_rng(0)
    tables = {"cls": rng.integers(0, len(CLASSES), 200).astype(np.int8), "ends_alnum": rng.random(200) < 0.5}
    for _ in range(300):
        head = int(rng.integers(0, 200))
        copy = int(rng.choice([-1, head, int(rng.integers(0, 200))]))
        p1 = float(rng.random())
        p2, ent, pc = p1 * float(rng.random()), float(rng.random()), float(rng.random()) * (copy >= 0)
        n, depth, last = int(rng.integers(0, 40)) * (copy >= 0), int(rng.integers(1, 9)), int(rng.integers(-1, 200))
        f = candidate_features([head], [p1], [p2], [ent], [pc], [copy], [n], [min(depth, 6)], [last], tables, 6)
        cands, valid, X = candidate_rows(head, p1, p2, ent, pc, copy, n, min(depth, 6), last, tables, 6)
        assert cands.tolist() == f["cands"][0].tolist() and valid.tolist() == f["valid"][0].tolist()
        np.testing.assert_allclose(X, f["X"][0], rtol=1e-6, atol=1e-6)


def test_a_records_folder_without_validation_books_only_trains(tiny_eagle, tmp_path):
    """Training genres recorded whole (no validation books) join a fit beside folders that have some; alone they
    are refused with the reason (the gate's calibration needs held-out books)."""
    from corpus_tools import record as rec_mod
    from gate.train.data import FitError
    from gate.train.fit import fit
    from helpers import SPLIT_REC

    model_dir, records, _, _ = tiny_eagle
    corpus = write_corpus(tmp_path / "corpus", [("e", "train", book_text(4, 6)), ("f", "train", book_text(5, 5))])
    rec_mod.record([model_dir], corpus, tmp_path / "train_only", layers=("0", "1", "2"), **SPLIT_REC)
    with pytest.raises(FitError, match="no records folder has a validation split"):
        fit(tmp_path / "train_only", tmp_path / "refused", log=lambda m: None, **EAGLE_FIT)
    logs = []
    fit([records, tmp_path / "train_only"], tmp_path / "both", log=logs.append, **{**EAGLE_FIT, "eagle_epochs": 1.0})
    meta = json.loads((tmp_path / "both" / "drafter.json").read_text())
    assert len(meta["precision_maps"]["fitted_on"]["records"]) == 2
    assert any("2 records folder(s)" in m for m in logs)
