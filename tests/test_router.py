"""The router for a big/small pair: fitted on tiny two-model records, decoding with it (lossless against greedy
`big`), refusal of another pair, the shared feature function, and the real Qwen pair (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UsageError
from corpus_tools import record as rec_mod
from gate.decode.drafters import load_gate
from gate.decode.loop import Decoder
from gate.decode.policies import Gate
from gate.model.load import read_meta
from gate.model.router import small_stats
from gate.train.fit import fit
from gate.train.fit_router import features_of, load_pair, pair_entries
from runtimes.hf import HFBackend
from runtimes.open import open_models

from helpers import PROMPTS, SPLIT_REC, book_text, call_main, greedy, lively, make_tiny_llama, save_model, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def truncated(big, n_layers: int):
    """A real smaller model of the family: the big model's first n_layers blocks, norm and output layer (its
    greedy tokens agree with the big model's at some positions, as a real small model's do)."""
    small = make_tiny_llama(big.config.vocab_size, layers=n_layers, hidden=big.config.hidden_size)
    missing = small.load_state_dict(big.state_dict(), strict=False).missing_keys
    assert not missing
    return small.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer):
    """(big dir, small dir, records, router artifact) over four small books in train / train / val / test."""
    root = tmp_path_factory.mktemp("pair")
    big = lively(make_tiny_llama(len(tiny_tokenizer), seed=3, layers=3), 4)
    big_dir = save_model(root / "big", big, tiny_tokenizer)
    small_dir = save_model(root / "small", truncated(big, 2), tiny_tokenizer)
    corpus = write_corpus(root / "corpus", [("a", "train", book_text(0, 6)), ("b", "train", book_text(1, 6)),
                                            ("c", "val", book_text(2, 5)), ("d", "test", book_text(3, 4))])
    rec_mod.record([big_dir, small_dir], corpus, root / "records", layers=("last",), topk=8, **SPLIT_REC)
    fit(root / "records", root / "router", drafter="router", router_pca=8, router_emb_pca=4, threads=1,
        target_precision=0.9, log=lambda m: None)
    return big_dir, small_dir, root / "records", root / "router"


def open_pair(big_dir, small_dir, kind="hf"):
    return open_models(big_dir, [small_dir], "float32", kind)


def test_router_artifact_names_both_models_and_beats_nothing_it_cannot(pair):
    big_dir, small_dir, records, router = pair
    meta = read_meta(router)
    assert meta["format"] == "skipgate-router/1"
    assert meta["big_model"]["name"] == big_dir and meta["small_model"]["name"] == small_dir
    assert meta["big_model"]["n_layers"] == 3 and meta["small_model"]["n_layers"] == 2
    test = meta["metrics"][f"test:{records}"]["all"]
    # the oracle is the share of positions where the small argmax is right: no rule can cover more at 90%+
    assert 0 < test["oracle"] < 1
    for rule in ("router", "max_prob", "entropy"):
        assert 0 <= test[rule] <= test["oracle"] / 0.9 + 1e-9
    assert len(meta["feature_names"]) == 8 + 3 + 8 + 4 + 5 + 3


def test_decode_features_equal_training_features(pair):
    """The router's features from records (training) and from the small backend's logits and hidden state
    (decoding) are the same function of the same numbers."""
    big_dir, small_dir, records, router = pair
    from corpus_tools.records import open_records

    rec = open_records(records)
    big, small = pair_entries(rec, records)
    d = load_pair(rec, records, "test", big, small)
    rt = open_pair(big_dir, small_dir)
    drafter = load_gate(rt, str(router))
    tokens = [int(t) for t in d.big.tokens[:40]]   # the first run of the test book starts at row 0
    assert d.big.run_start[39] == 0
    drafter.lm.reset()
    rows = np.arange(10, 40)
    want = features_of(drafter.features, d, rows, np.ones(len(rows), dtype=np.int64))
    for i, t in enumerate(rows):
        logits = drafter.lm(tokens[:t + 1])
        tok, topk_p, ent = small_stats(logits, 8)
        assert tok == d.small.argmax[t]
        copy_tok, copy_len = d.copy_tok[t], d.copy_len[t]
        got = drafter.features(topk_p, ent, drafter.lm.hidden[None], [tok], [copy_tok], [copy_len], [1])
        torch.testing.assert_close(got[0], want[i], atol=2e-2, rtol=1e-2)   # hidden states stored in float16


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3])
def test_router_verify_is_lossless(pair, tiny_tokenizer, threshold):
    big_dir, small_dir, _, router = pair
    rt = open_pair(big_dir, small_dir)
    drafter = load_gate(rt, str(router))
    drafted = 0
    for prompt in PROMPTS[:3]:
        ids = tiny_tokenizer(prompt).input_ids
        want = greedy(rt.big.model, ids, 24)
        res = Decoder(rt.big, Gate(drafter, threshold=threshold), verify=True).generate(ids, 24)
        assert res.ids == want, (prompt, threshold)
        drafted += res.ledger["drafted"]
    if threshold == 0.0:   # every position drafted by the small model, each checked by the big model
        assert drafted > 0


def test_router_lossy_skips_are_the_small_models_tokens(pair, tiny_tokenizer):
    big_dir, small_dir, _, router = pair
    rt = open_pair(big_dir, small_dir)
    drafter = load_gate(rt, str(router))
    ids = tiny_tokenizer(PROMPTS[4]).input_ids
    res = Decoder(rt.big, Gate(drafter, threshold=0.0)).generate(ids, 20)
    small = HFBackend(rt.predictor(small_dir).model, "s")
    text = list(ids)
    for tok, src in zip(res.ids, res.sources):
        if src == "skip":
            small.reset()
            want = int(small.forward(text)[0][-1].argmax())
            assert tok == want
        text.append(tok)
    assert res.sources.count("skip") > 0


def test_router_refuses_another_small_or_big_model(pair, tiny_tokenizer, tmp_path):
    big_dir, small_dir, _, router = pair
    other = save_model(tmp_path / "other", truncated(make_tiny_llama(len(tiny_tokenizer), seed=9, layers=3), 1),
                       tiny_tokenizer)
    rt = open_pair(big_dir, other)                     # same tokenizer, another small model (1 layer, not 2)
    with pytest.raises(UsageError, match="small model"):
        load_gate(rt, str(router))
    rt = open_pair(other, small_dir)                   # another big model
    with pytest.raises(UsageError, match="n_layers"):
        load_gate(rt, str(router))


def test_infer_cli_uses_the_routers_small_model(pair, tmp_path):
    """infer.py opens the small model the router names (no --small) and decodes losslessly with it."""
    from gate.decode.cli import main

    big_dir, small_dir, _, router = pair
    rc, err = call_main(main, ["It is a truth", "--model", big_dir, "--policy", "gate", "--gate", router,
                               "--threshold", "0", "--verify", "-m", "12", "--json", tmp_path / "r.json"])
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    rt = open_pair(big_dir, small_dir)
    assert res["output_ids"] == greedy(rt.big.model, res["prompt_ids"], 12)
    assert res["ledger"]["drafted"] > 0


def test_fit_router_refuses_records_of_one_model(tmp_path, tiny_tokenizer, tiny_llama):
    d = save_model(tmp_path / "m", tiny_llama, tiny_tokenizer)
    corpus = write_corpus(tmp_path / "corpus", [("a", "train", book_text(0, 2)), ("c", "val", book_text(2, 2))])
    rec_mod.record([d], corpus, tmp_path / "records", layers=("last",), **SPLIT_REC)
    import train

    rc, err = call_main(train.main, ["fit", "--drafter", "router", "--records", tmp_path / "records", "--out",
                                     tmp_path / "r"])
    assert rc == 2 and "two models" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.real_model
def test_real_qwen_pair_end_to_end_on_llamacpp(tmp_path):
    """The real pair, Qwen2.5-Coder 0.5B -> 1.5B (installed on first use), on llama.cpp: records of a real
    manual's text (a few hundred positions each split), a router fitted on them, and lossless decoding with it:
    token-identical to the big model's greedy text, or parting from it only at a numerical near-tie (Q4_K weights
    make llama.cpp's batched logits differ slightly from one-token ones); the artifact refuses the pair swapped."""
    pytest.importorskip("llama_cpp")
    from corpus_tools.epub import extract_text
    from gate.decode.policies import BigOnly

    paragraphs = [p for p in extract_text(ROOT / "tests/data/live-manual.en.epub").paragraphs if len(p) > 200]
    assert len(paragraphs) >= 30
    corpus = write_corpus(tmp_path / "corpus", [("a", "train", "\n\n".join(paragraphs[:10])),
                                                ("b", "val", "\n\n".join(paragraphs[10:20])),
                                                ("c", "test", "\n\n".join(paragraphs[20:30]))])
    big, small = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
    rec_mod.record([big, small], corpus, tmp_path / "records", backend="llama.cpp", layers=("last",),
                   context=256, stride=192, max_tokens_per_book=300, progress=False)
    fit(tmp_path / "records", tmp_path / "router", drafter="router", router_pca=8, router_emb_pca=4, threads=1,
        target_precision=0.9, log=lambda m: None)
    rt = open_models(big, [small], "float32", "llama.cpp")
    drafter = load_gate(rt, str(tmp_path / "router"))
    assert drafter.features.small.mean.shape[0] == 896 and drafter.lm.hidden_layer == 24
    ids = rt.tokenizer(paragraphs[31][:200]).input_ids
    want = Decoder(rt.big, BigOnly()).generate(ids, 12).ids
    res = Decoder(rt.big, Gate(drafter, threshold=0.3), verify=True).generate(ids, 12)
    assert res.ledger["drafted"] > 0
    if res.ids != want:   # Qwen's Q4_K: llama.cpp's batched and one-token logits differ slightly (README)
        d = next(i for i, (a, b) in enumerate(zip(res.ids, want)) if a != b)
        rt.big.reset()
        logits = rt.big.forward(ids + want[:d], keep=1)[0][-1]
        assert abs(float(logits[want[d]] - logits[res.ids[d]])) < 0.25, "a verified draft lost to a clear winner"
    swapped = open_models(small, [big], "float32", "llama.cpp")
    with pytest.raises(UsageError):
        load_gate(swapped, str(tmp_path / "router"))


def test_confidence_gate_ignores_the_vector_features():
    """fit_gates' confidence-only gate is trained with the hidden-state / embedding columns zeroed: its weights
    there are exactly zero, so at decode time those columns (never zero) do not move its score."""
    from gate.train.config import FitConfig
    from gate.train.fit_router import fit_gates

    rng = np.random.default_rng(0)
    names = ["p1", "entropy_norm", "small_pc0", "small_pc1", "emb_pc0", "copy_len"]
    X = torch.from_numpy(rng.normal(size=(600, len(names))).astype(np.float32))
    y = (X[:, 0] + X[:, 2] > 0).numpy()
    gates = fit_gates(X, y, names, FitConfig(drafter="router"))
    conf = gates["logreg_confidence"]
    X2 = X.clone()
    X2[:, 2:5] = torch.from_numpy(rng.normal(size=(600, 3)).astype(np.float32))
    assert torch.equal(conf.score(X), conf.score(X2))
    assert not torch.equal(gates["logreg"].score(X), gates["logreg"].score(X2))


def test_fit_router_refuses_a_small_model_that_is_a_copy_of_the_big_one(tmp_path, tiny_tokenizer, tiny_llama):
    """Issue 22, case 11: the small model's argmax always equals the big one's: one class, nothing to learn."""
    big = save_model(tmp_path / "big", tiny_llama, tiny_tokenizer)
    copy = save_model(tmp_path / "copy", tiny_llama, tiny_tokenizer)
    corpus = write_corpus(tmp_path / "corpus", [("a", "train", book_text(0, 2)), ("c", "val", book_text(2, 2))])
    rec_mod.record([big, copy], corpus, tmp_path / "records", layers=("last",), topk=8, **SPLIT_REC)
    import train

    rc, err = call_main(train.main, ["fit", "--drafter", "router", "--records", tmp_path / "records", "--out",
                                     tmp_path / "r"])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert "too little data / one class" in errors[0] and "is the small model a copy of the big one?" in errors[0]
    assert not (tmp_path / "r").exists()


def test_router_scores_through_a_precision_map_and_calibrate_rewrites_only_it(pair, tmp_path, tiny_tokenizer):
    """Issue 19: the router's probability goes through a precision map fitted on validation (monotone, bounded,
    no copy rule: the copy enters as features); train.py calibrate refits it and the threshold, its tensors byte
    for byte, refusing its training books; an artifact from before the map decodes with raw probabilities."""
    from test_precision_maps import calibrate_cli, check_maps, files_sha, make_old

    big_dir, small_dir, records, router = pair
    meta = read_meta(router)
    maps = load_gate(open_pair(big_dir, small_dir), str(router)).maps
    assert maps is not None and maps.copy is None and set(meta["precision_maps"]["gates"]) == {meta["primary_gate"]}
    check_maps(maps)
    rc, err = calibrate_cli(records, router, tmp_path / "new", "--split", "test")
    assert rc == 0 and "pairs: " in err and ("of the oracle" in err or "skip nothing here" in err), err[-2000:]
    new = read_meta(tmp_path / "new")
    assert new["recalibrated"]["split"] == "test" and new["calibration"]["threshold"] == new["threshold"]
    assert files_sha(tmp_path / "new") == files_sha(router) and list(files_sha(router)) == ["router.safetensors"]
    rc, err = calibrate_cli(records, router, tmp_path / "t", "--split", "train")
    assert rc == 2 and "was trained on" in err
    make_old(router, tmp_path / "old")
    rt = open_pair(big_dir, small_dir)
    old, cur = load_gate(rt, str(tmp_path / "old")), load_gate(rt, str(router))
    assert old.maps is None
    ids = tiny_tokenizer(PROMPTS[0]).input_ids
    for dr in (old, cur):
        dr.start()
        dr.lm.reset()
    (t1, s1), (t2, s2) = old.propose(ids, None, 1), cur.propose(ids, None, 1)
    assert t1 == t2 and s2 == pytest.approx(float(cur.maps.gate["none"](s1)))   # raw probability, then its map
