"""LlamaCppBackend against the Backend protocol, on the packaged SmolLM2-135M GGUF (tens of tokens each).

One llama.cpp thread: robust on a busy machine (llama.cpp shares torch's OpenMP runtime, whose default spin-wait
stalls 2 threads on 2 busy cores)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (`make venv` builds it from source)")

from runtimes.info import ContextLengthError
from runtimes.llamacpp import LayerUnavailable, LlamaCppBackend
from runtimes.sources import packaged_gguf

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.")
N_LAYERS = 30   # SmolLM2-135M


@pytest.fixture(scope="module")
def gguf():
    return str(packaged_gguf("smollm2-135m")[0])


@pytest.fixture(scope="module")
def high_level(gguf):
    """The binding's own high-level model: the tokenizer here, and the greedy reference. Flash attention as in
    the backend (Llama() defaults to off, whose batched and one-token logits differ by up to 0.6)."""
    llm = llama_cpp.Llama(gguf, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False, flash_attn=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def ids(high_level):
    return high_level.tokenize(TEXT.encode(), add_bos=False)


@pytest.fixture(scope="module")
def backend(gguf):
    b = LlamaCppBackend(gguf, name="smollm2-135m", hidden_layer=N_LAYERS, n_ctx=256, n_threads=1)
    yield b
    b.close()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    # Measured bit-identical here (flash attention makes llama.cpp's logits batch-invariant).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_shapes_and_counters(backend, ids):
    backend.reset()
    logits, hidden = backend.forward(ids, keep=3)
    assert logits.shape == (3, backend.vocab_size) and logits.dtype == torch.float32
    assert hidden.shape == (3, backend.hidden_size) and hidden.dtype == torch.float32
    assert (backend.n_cached, backend.calls, backend.tokens_fed) == (len(ids), 1, len(ids))
    logits, _ = backend.forward(ids[:2])            # keep=None: every row
    assert logits.shape[0] == 2 and backend.n_cached == len(ids) + 2
    backend.crop(len(ids))
    assert backend.tokens_cropped == 2


def test_batched_equals_token_by_token(backend, ids):
    backend.reset()
    batched, hb = backend.forward(ids)
    backend.reset()
    rows = [backend.forward([t]) for t in ids]
    close(batched, torch.cat([r[0] for r in rows]))
    close(hb, torch.cat([r[1] for r in rows]))
    assert backend.calls == len(ids)


def test_long_pass_equals_token_by_token(backend, ids):
    """A pass longer than llama.cpp's large-batch kernel threshold (64 tokens) is still batch-invariant."""
    long = (ids * 4)[:100]
    backend.reset()
    batched, _ = backend.forward(long)
    backend.reset()
    close(batched, torch.cat([backend.forward([t])[0] for t in long]))


def test_crop_then_refeed(backend, ids):
    backend.reset()
    full, hidden = backend.forward(ids)
    k = len(ids) // 2
    backend.crop(k)
    assert backend.n_cached == k
    again, hidden2 = backend.forward(ids[k:])
    close(again, full[k:])
    close(hidden2, hidden[k:])
    backend.crop(0)
    close(backend.forward(ids, keep=1)[0], full[-1:])


def test_hidden_times_output_embedding_is_logits(backend, ids, gguf):
    """SmolLM2 ties its output layer to the token embedding: hidden @ E.T reproduces llama.cpp's logits."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(gguf).tensors if t.name == "token_embd.weight")
    emb = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    assert emb.shape == (backend.vocab_size, backend.hidden_size)
    backend.reset()
    logits, hidden = backend.forward(ids, keep=4)
    mine = hidden @ emb.T
    # llama.cpp quantises the activations to 8 bits for the q8_0 matmul: close, not bit-equal (measured 0.011).
    err = (mine - logits).abs().max() / logits.abs().max()
    assert err < 0.03, float(err)
    assert torch.equal(mine.argmax(-1), logits.argmax(-1))


def test_no_hidden_layer_same_logits(backend, ids):
    backend.reset()
    with_hidden, _ = backend.forward(ids, keep=2)
    backend.hidden_layer = None
    try:
        backend.reset()
        logits, hidden = backend.forward(ids, keep=2)
    finally:
        backend.hidden_layer = N_LAYERS
    assert hidden is None
    close(logits, with_hidden)


LAYERS = (2, 15, 29)   # an EAGLE-3 drafter's low, middle and high layer (HF numbering: block inputs)


@pytest.fixture(scope="module")
def layered(gguf):
    """A second backend reading three inner layers (llama_set_embeddings_layer_inp) and none of the last."""
    b = LlamaCppBackend(gguf, name="smollm2-135m", hidden_layer=LAYERS, n_ctx=256, n_threads=1)
    yield b
    b.close()


def split(hidden: torch.Tensor, k: int) -> torch.Tensor:
    return hidden.unflatten(-1, (k, -1))   # [rows, k * d] -> [rows, k, d]


def test_layers_match_transformers(layered, ids, smollm2):
    """Layer l < n_layers is the input of block l, i.e. transformers' hidden_states[l] (pre-norm residual
    stream): every row is closest to that entry, not its neighbours; n_layers is the post-norm last state.
    Q4_1 against its float32 de-quantisation, so close, not equal (measured min cosine 0.998-0.9999)."""
    with torch.no_grad():
        hs = smollm2.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    layered.reset()
    _, h = layered.forward(ids)
    assert h.shape == (len(ids), len(LAYERS) * layered.hidden_size)
    cos = torch.nn.functional.cosine_similarity
    for j, layer in enumerate(LAYERS):
        mine = split(h, len(LAYERS))[:, j]
        assert cos(mine, hs[layer][0]).min() > 0.99, layer
        for other in (layer - 1, layer + 1):
            assert (cos(mine, hs[layer][0]) > cos(mine, hs[other][0])).all(), (layer, other)
    layered.hidden_layer = (0, N_LAYERS)
    try:
        layered.reset()
        _, h = layered.forward(ids)
    finally:
        layered.hidden_layer = LAYERS
    for j, layer in enumerate((0, N_LAYERS)):
        assert cos(split(h, 2)[:, j], hs[layer][0]).min() > 0.99, layer


def test_layers_leave_logits_and_int_layer_as_they_were(backend, layered, ids):
    """Reading layers changes no logit; the last layer inside a tuple is the int setting's rows exactly, and the
    int setting still returns [rows, d]."""
    backend.reset()
    want_logits, want_last = backend.forward(ids, keep=3)
    assert want_last.shape == (3, backend.hidden_size) and backend.hidden_layer == N_LAYERS
    layered.reset()
    close(layered.forward(ids, keep=3)[0], want_logits)
    layered.hidden_layer = [15, N_LAYERS]        # a list is taken as the tuple
    try:
        assert layered.hidden_layer == (15, N_LAYERS)
        layered.reset()
        logits, h = layered.forward(ids, keep=3)
    finally:
        layered.hidden_layer = LAYERS
    close(logits, want_logits)
    assert torch.equal(split(h, 2)[:, 1], want_last)


def test_layers_through_crop_reset_and_hidden_all(layered, ids):
    """With layers on, a batched pass gives the one-token steps' rows, a crop and re-feed the same rows again,
    hidden_all a row per fed token, reset a fresh start."""
    layered.reset()
    full_logits, _ = layered.forward(ids)
    layered.hidden_all = True
    try:
        layered.reset()
        logits, full = layered.forward(ids, keep=1)
        assert full.shape == (len(ids), len(LAYERS) * layered.hidden_size)
        close(logits, full_logits[-1:])
        layered.reset()
        steps = [layered.forward([t], keep=1) for t in ids]
        close(torch.cat([s[1] for s in steps]), full)
        k = len(ids) // 2
        layered.crop(k)
        again_logits, again = layered.forward(ids[k:], keep=2)
        close(again, full[k:])
        close(again_logits, full_logits[-2:])
    finally:
        layered.hidden_all = False
    layered.reset()
    _, last = layered.forward(ids, keep=2)
    close(last, full[-2:])


def test_score_windows_any_layers(layered, ids):
    """Recording on llama.cpp: {layer: [B, L, d]} for inner layers and the last, the same rows as forward."""
    x = torch.tensor([ids[:12], ids[5:17]])
    logits, hid = layered.score_windows(x, keep=2, layers=[2, 15, N_LAYERS])
    assert logits.shape == (2, 2, layered.vocab_size) and set(hid) == {2, 15, N_LAYERS}
    assert layered.hidden_layer == LAYERS and not layered.hidden_all   # the setting comes back
    for i, row in enumerate(x.tolist()):
        for layer in (2, 15, N_LAYERS):
            layered.hidden_layer = layer
            layered.hidden_all = True
            try:
                layered.reset()
                close(layered.forward(row, keep=1)[1], hid[layer][i])
            finally:
                layered.hidden_all = False
                layered.hidden_layer = LAYERS


@pytest.mark.parametrize("layers", [LAYERS, (2, N_LAYERS), N_LAYERS])
def test_slots_with_layers_equal_plain_backend(gguf, layered, ids, layers):
    """LlamaCppSlots with a tuple of layers (or the int): each slot's rows (prompts in chunks, then one-token
    steps, several sequences in one pass) are the plain backend's."""
    from functools import partial

    from runtimes.batched import LlamaCppSlots, Scheduler

    prompts = [ids, ids[::-1][:9], ids[3:]]
    want = []
    layered.hidden_layer = layers
    try:
        for p in prompts:
            layered.reset()
            want.append(layered.forward(p, keep=2)[1])
            want.append(layered.forward(p[:3], keep=1)[1])
    finally:
        layered.hidden_layer = LAYERS
    ctx = LlamaCppSlots(gguf, n_slots=3, slot_ctx=64, hidden_layer=layers, n_threads=1, weights_of=layered)
    got = {}

    def job(i):
        slot = ctx.slot(i)
        got[i] = [slot.forward(prompts[i], keep=2)[1], slot.forward(prompts[i][:3], keep=1)[1]]

    try:
        Scheduler(chunk=8).run([partial(job, i) for i in range(3)])
    finally:
        ctx.close()
    for i in range(3):
        close(got[i][0], want[2 * i])
        close(got[i][1], want[2 * i + 1])


def test_inner_layers_need_a_graph_that_marks_them(layered, monkeypatch):
    """On an architecture whose llama.cpp graph does not mark block inputs (enabling one would abort the process),
    inner layers raise LayerUnavailable and the setting stays; the last layer still works."""
    monkeypatch.setattr(layered, "arch", "qwen2")
    with pytest.raises(LayerUnavailable, match="last layer only"):
        layered.hidden_layer = (2, N_LAYERS)
    assert layered.hidden_layer == LAYERS
    layered.hidden_layer = N_LAYERS
    monkeypatch.undo()
    layered.hidden_layer = LAYERS


def test_context_and_bad_input(backend, ids):
    backend.reset()
    with pytest.raises(ContextLengthError, match="context length"):
        backend.forward([ids[0]] * (backend.n_ctx + 1))
    assert backend.n_cached == 0
    with pytest.raises(ValueError, match="token ids"):
        backend.forward([backend.vocab_size])
    with pytest.raises(ValueError, match="crop"):
        backend.crop(1)
    with pytest.raises(ValueError, match="at least one"):
        backend.forward([])


def test_big_policy_matches_binding_greedy(backend, high_level, ids):
    """`--policy big` through the project's Decoder == llama-cpp-python's own greedy generate."""
    from gate.decode.loop import Decoder
    from gate.decode.policies import BigOnly

    n_new = 24
    ref = []
    high_level.reset()
    for tok in high_level.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        ref.append(tok)
        if len(ref) == n_new:
            break
    backend.hidden_layer = None
    try:
        res = Decoder(backend, BigOnly()).generate(ids, n_new)
    finally:
        backend.hidden_layer = N_LAYERS
    assert res.ids == ref
    assert res.ledger["big_calls"] == n_new


def test_copy_verify_lossless(backend, ids):
    """`--policy copy --verify` on llama.cpp: drafts are checked by batched catch-up rows, output == big."""
    from gate.decode.loop import Decoder
    from gate.decode.policies import BigOnly, Copy

    prompt = ids + ids[:12]   # a repeat in the prompt: the copy rule drafts from it
    big = Decoder(backend, BigOnly()).generate(prompt, 32)
    copy = Decoder(backend, Copy(min_match=3), verify=True).generate(prompt, 32)
    assert copy.ids == big.ids
    assert copy.ledger["skipped"] > 0 and copy.ledger["big_calls"] < big.ledger["big_calls"]
    assert backend.hidden_layer is None   # the loop asks for no hidden state for big or copy


def test_factory_refuses_early_exit():
    from common.errors import UsageError
    from runtimes.open import open_backend

    with pytest.raises(UsageError, match="'hf' backend"):
        open_backend("self:15", "llama.cpp")


def test_infer_cli_on_llamacpp(backend, ids, tmp_path):
    """infer.py --backend llama.cpp --policy big: the same tokens as the backend's own greedy loop."""
    import json

    from gate.decode.cli import main
    from gate.decode.loop import Decoder
    from gate.decode.policies import BigOnly

    out = tmp_path / "r.json"
    rc = main(["--backend", "llama.cpp", "--policy", "big", "-m", "12", "--threads", "1", "--quiet",
               "--json", str(out), TEXT])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["output_ids"] == Decoder(backend, BigOnly()).generate(r["prompt_ids"], 12).ids


def test_gguf_runtime_loads_no_transformers_weights_and_matches_hf_identity(smollm2, monkeypatch):
    """open_models on llama.cpp reads the tokenizer from the GGUF and the ModelInfo from llama.cpp: the same
    tokenizer fingerprint, layers, width and vocabulary as the transformers model (so artifacts fitted on
    transformers records are checked alike), and transformers' model loader is never called."""
    from runtimes.open import eos_ids_of, open_models

    monkeypatch.setattr("runtimes.open.load", lambda *a, **k: pytest.fail("loaded transformers weights"))
    rt = open_models("smollm2-135m", [], "float32", "llama.cpp")
    for key in ("fingerprint", "n_layers", "hidden_size", "vocab_size"):
        assert getattr(rt.big_info, key) == getattr(smollm2.info, key), key
    assert set(eos_ids_of(smollm2)) <= set(rt.eos_ids)
    assert rt.tokenizer("a truth").input_ids == smollm2.tokenizer("a truth").input_ids


def test_record_on_llamacpp_matches_transformers_records(tmp_path):
    """train.py record --backend llama.cpp: the same positions and tokens as the transformers records of the same
    GGUF; argmax and the hidden states of an inner and the last layer agree up to the de-quantisation (llama.cpp
    computes the quantised weights, transformers their float32 copy)."""
    from corpus_tools import record as rec_mod
    from corpus_tools.records import open_records

    from helpers import SPLIT_REC, book_text, write_corpus

    corpus = write_corpus(tmp_path / "corpus", [("a", "train", book_text(0, 2)), ("b", "test", book_text(1, 2))])
    opts = dict(SPLIT_REC, layers=("middle", "last"), max_tokens_per_book=60)
    rec_mod.record(["smollm2-135m"], corpus, tmp_path / "hf", **opts)
    rec_mod.record(["smollm2-135m"], corpus, tmp_path / "cpp", backend="llama.cpp", **opts)
    a, b = (open_records(tmp_path / k).load("train") for k in ("hf", "cpp"))
    assert (a["token"] == b["token"]).all() and (a["target"] == b["target"]).all()
    m = "smollm2-135m/"
    assert (a[m + "argmax"] == b[m + "argmax"]).mean() >= 0.9
    layers = sorted(int(k.rsplit("/", 1)[1]) for k in a if k.startswith(m + "hidden/"))
    assert len(layers) == 2 and layers[-1] == N_LAYERS and sorted(k for k in b if "hidden/" in k) == sorted(
        k for k in a if "hidden/" in k)
    for layer in layers:
        ha, hb = (torch.from_numpy(np.asarray(x[m + f"hidden/{layer}"], dtype=np.float32)) for x in (a, b))
        assert torch.nn.functional.cosine_similarity(ha, hb).min() > 0.98, layer


def test_record_refuses_layers_the_graph_does_not_mark_before_any_work(tmp_path, monkeypatch):
    """On an architecture whose llama.cpp graph does not mark layer inputs (qwen2), --layers middle is refused
    before anything is pinned in --out: a retry with --layers last is not blocked by a settings.json of the first."""
    import runtimes.llamacpp as lc
    from corpus_tools import record as rec_mod

    from helpers import SPLIT_REC, book_text, write_corpus

    monkeypatch.setattr(lc, "LAYER_INP_ARCHS", frozenset())
    corpus = write_corpus(tmp_path / "corpus", [("a", "train", book_text(0, 2))])
    opts = dict(SPLIT_REC, max_tokens_per_book=40, backend="llama.cpp")
    with pytest.raises(LayerUnavailable):
        rec_mod.record(["smollm2-135m"], corpus, tmp_path / "out", **{**opts, "layers": ("middle",)})
    assert not (tmp_path / "out" / "settings.json").exists()
    rec_mod.record(["smollm2-135m"], corpus, tmp_path / "out", **{**opts, "layers": ("last",)})


def test_selfgen_on_llamacpp_is_the_backends_greedy_text(backend, tmp_path):
    """train.py selfgen --backend llama.cpp: each sample is the prompt + llama.cpp's greedy continuation."""
    from corpus_tools import selfgen as sg
    from gate.decode.loop import Decoder
    from gate.decode.policies import BigOnly
    from runtimes.loading import load_tokenizer

    from helpers import book_text, write_corpus

    corpus = write_corpus(tmp_path / "corpus", [("a", "train", book_text(0, 3))])
    entries = sg.selfgen("smollm2-135m", corpus, tmp_path / "out", splits=["train"], per_book=2, prompt_tokens=12,
                         new_tokens=10, progress=False, backend="llama.cpp")
    tok = load_tokenizer("smollm2-135m")
    prompts = sg.prompts_of_book((corpus / "text" / "a.txt").read_text(), tok, 2, 12)
    for entry, prompt in zip(entries, prompts):
        want = Decoder(backend, BigOnly()).generate(prompt, 10).ids
        assert (tmp_path / "out" / "text" / f"{entry['book_id']}.txt").read_text() == tok.decode(prompt + want)


@pytest.mark.parametrize("shape", ["cheap", "measured"])
def test_planned_copy_verify_is_greedy_big(backend, ids, shape, tmp_path, monkeypatch):
    """The default lossless decode (--verify, chains sized by the planner) on the real model: the same tokens as
    greedy `big`. 'cheap' pretends extra tokens cost nothing, so the planner sends long chains that get cut by
    rollbacks; 'measured' uses this machine's cost curve, measured through the backend (cached in tmp)."""
    from gate.decode.cost import CostProfile, Planner, load_or_measure
    from gate.decode.loop import Decoder
    from gate.decode.policies import BigOnly, Copy

    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    backend.hidden_layer = None
    if shape == "cheap":
        ks = list(range(1, 34))
        prof = CostProfile({}, 10.0, ks, [1 + 0.05 * (k - 1) for k in ks])
    else:
        prof = load_or_measure(backend, ks=(1, 2, 4, 8, 16, 32), reps=2)
    pol = Copy(min_match=1, max_skip=33)
    plan = Planner(prof, pol.acceptance())
    for prompt in (ids + ids[:12], ids[::-1] + ids):
        big = Decoder(backend, BigOnly()).generate(prompt, 40)
        res = Decoder(backend, pol, verify=True, planner=plan).generate(prompt, 40)
        assert res.ids == big.ids
    if shape == "cheap":
        assert plan.stats["kept"] > 0 and res.ledger["big_calls"] < big.ledger["big_calls"]


def test_infer_cli_default_backend_and_planned_verify(ids, tmp_path, monkeypatch):
    """infer.py on a packaged alias picks llama.cpp by itself and says so; --policy copy --verify (planned by
    default) gives big's tokens; the ledger reports the plan."""
    import json

    from gate.decode.cli import main

    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    monkeypatch.setattr("gate.decode.cost.NOISY", float("inf"))   # a test run's passes need not agree
    monkeypatch.setattr("common.cpu.QUIET_CORES", float("inf"))   # and the suite may share the machine
    outs = {}
    for policy in ("big", "copy"):
        out = tmp_path / f"{policy}.json"
        args = ["--policy", policy, "-m", "24", "--threads", "1", "--quiet", "--json", str(out), TEXT + " " + TEXT]
        assert main(args + (["--verify"] if policy == "copy" else [])) == 0
        outs[policy] = json.loads(out.read_text())
    assert outs["copy"]["output_ids"] == outs["big"]["output_ids"]
    assert outs["copy"]["config"]["backend"] == "auto" and outs["copy"]["ledger"]["models"]["smollm2-135m"]
    assert outs["copy"]["ledger"]["plan"]["chains"] > 0
    assert list((tmp_path / "profiles").glob("*.json"))     # the cost curve was measured once and cached


def test_exact_pass_is_probed_once_and_cached(gguf, tmp_path, monkeypatch):
    """SmolLM2 Q4_1: every pass up to n_ubatch gives the one-token steps' logits bit for bit (exact_pass None);
    the probe leaves the backend reset with its hidden-state setting; a second backend reads the cache."""
    import runtimes.llamacpp as lc

    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    b = LlamaCppBackend(gguf, name="smollm2-135m", hidden_layer=N_LAYERS, n_ctx=256, n_threads=1)
    assert b.exact_pass is None and b.n_cached == 0 and b.hidden_layer == N_LAYERS
    assert len(list((tmp_path / "exact_pass").glob("*.json"))) == 1
    b.close()
    monkeypatch.setattr(lc, "probe_exact_pass", lambda backend: pytest.fail("probed again"))
    b = LlamaCppBackend(gguf, name="smollm2-135m", n_ctx=256, n_threads=1)
    assert b.exact_pass is None
    b.close()


def test_profile_command_and_requantized_copy(tmp_path, monkeypatch, capsys):
    """`train.py profile MODEL --requant Q4_0`: both cost curves printed, the requantized copy cached and never
    the model that decodes (a requantized model is a different model)."""
    from gate.decode.cost import main

    monkeypatch.setenv("SKIPGATE_CACHE", str(tmp_path))
    monkeypatch.setattr("gate.decode.cost.NOISY", float("inf"))   # a test run's passes need not agree
    monkeypatch.setattr("common.cpu.QUIET_CORES", float("inf"))   # and the suite may share the machine
    assert main(["smollm2-135m", "--threads", "1", "--reps", "1", "--requant", "Q4_0"]) == 0
    out = capsys.readouterr().out
    assert "as shipped" in out and "requantized Q4_0" in out and out.count("best ceiling") == 2
    assert len(list((tmp_path / "requantized").glob("*.Q4_0.gguf"))) == 1
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


def test_a_copied_sequence_continues_like_a_fed_one(gguf, layered, ids):
    """LlamaCppSlots.copy_sequence (how the batch cost curve fills 64 sequences at once): a sequence given another's
    cache by llama_memory_seq_cp gives, bit for bit, the logits of one that was fed the same prefix."""
    from runtimes.batched import LlamaCppSlots

    ctx = LlamaCppSlots(gguf, n_slots=3, slot_ctx=64, n_threads=1, weights_of=layered)
    try:
        ctx.decode([(0, ids, 1), (1, ids, 1)])
        ctx.copy_sequence(0, 2)
        assert ctx.slots[2].n_cached == len(ids)
        spans = ctx.decode([(i, [ids[0], ids[1]], 2) for i in range(3)])
        rows = [ctx.rows(*span)[0].clone() for span in spans]
    finally:
        ctx.close()
    assert torch.equal(rows[2], rows[1]) and torch.equal(rows[0], rows[1])
