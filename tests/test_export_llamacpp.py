"""The exported EAGLE-3 draft, run by llama.cpp's own speculative decoding (issue 28): converted by the pinned
llama.cpp's convert_hf_to_gguf.py and decoded by its llama-speculative-simple (--spec-type draft-eagle3), the output
must be llama.cpp's plain greedy decode of the same GGUF, and every token llama.cpp drafts must be the one the
feature head drafts itself from the same context (FeatureHead / ChainCache over the target's layer inputs).

Slow: the converter needs the llama-cpp-python source (fetched once into the cache) and the programs are built by
`make llama-tools` (skipped, saying so, when they are not there). A tiny random LLaMA over SmolLM2's tokenizer (one
llama.cpp's converter knows) is the target; a real trained SmolLM2 head at runs/eagle3/gate is checked too if it
exists.
"""
import json
import re
from pathlib import Path

import pytest

from gate.model.eagle import ChainCache
from helpers import ROOT, assert_one_error_line, call_main, lively, make_tiny_llama, split_records
from runtimes.llama_tools import REQUIRED_TOOLS, convert_hf_to_gguf, find_tool, plain_greedy, speculative_simple

pytestmark = pytest.mark.slow

FIT = dict(drafter="eagle", eagle_layers="1,2,3", eagle_vocab=256, eagle_window=16, eagle_batch=8, eagle_depth=3,
           eagle_epochs=20.0, eagle_lr=3e-3, dtype="float32", threads=1)   # 20 epochs: the gate needs some right pairs
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
REAL_GATE = ROOT / "runs" / "eagle3" / "gate"


def need_tools():
    missing = [t for t in REQUIRED_TOOLS if find_tool(t) is None]
    if missing:
        pytest.skip(f"llama.cpp's {', '.join(missing)} not built: run `make llama-tools` (or set SKIPGATE_LLAMA_BIN "
                    "to a llama.cpp build's bin/)")


def export(*args):
    import train

    return call_main(train.main, ["export", *args])


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """(HF folder, GGUF f32, trained feature-head artifact): a 4-block tiny LLaMA over SmolLM2's tokenizer whose
    blocks write strongly (its greedy text depends on the context), and a head fitted on its records."""
    from gate.train.fit import fit
    from runtimes.loading import load_tokenizer

    need_tools()
    root = tmp_path_factory.mktemp("llamacpp_eagle3")
    tok = load_tokenizer("smollm2-135m")
    model = lively(make_tiny_llama(len(tok), layers=4), seed=3)
    model_dir, _, records = split_records(root, model, tok, ("1", "2", "3"))
    gguf = convert_hf_to_gguf(model_dir, root / "target.gguf", "f32")
    fit(records, root / "eagle", log=lambda m: None, **FIT)
    return Path(model_dir), gguf, root / "eagle"


def target_rows(gguf, ids, layers):
    """The target's layer inputs at every position of ids, from llama.cpp itself (the binding's backend over the
    same GGUF: HF's float32 rows of a model this lively differ from llama.cpp's by up to a few percent)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make venv` builds it)")
    from runtimes.llamacpp import LlamaCppBackend

    big = LlamaCppBackend(str(gguf), hidden_layer=tuple(layers), n_ctx=max(256, len(ids) + 8), n_threads=1)
    try:
        big.hidden_all = True
        _, rows = big.forward(list(ids), keep=1)
        return rows.clone()
    finally:
        big.close()


def chain_drafts(head, rows, prompt_ids, rounds):
    """For every draft round llama.cpp ran: (its drafts, the feature head's own drafts from the same context, the
    head's top-1 margins). The context of a round is the prompt and every token decoded before it; the head reads
    the target's rows at every position but the last (rows: the target's layer inputs at head.layers), as
    llama.cpp's draft does."""
    out, ctx = [], list(prompt_ids)
    for r in rounds:
        cache, seq, mine, margins = ChainCache(head), list(ctx), [], []
        for d in r["drafts"]:
            top = cache.draft(seq, rows[:len(ctx) - 1]).topk(2)
            mine.append(int(head.draft_ids[top.indices[0]]))
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(d)
        out.append((r["drafts"], mine, margins))
        ctx += r["drafts"][:r["accepted"]] + [r["target"]]
    return out


def generated(rounds) -> list[int]:
    return [t for r in rounds for t in r["drafts"][:r["accepted"]] + [r["target"]]]


def test_llamacpp_drafts_what_the_head_drafts_and_keeps_greedy_output(tiny_target, tmp_path):
    from transformers import AutoTokenizer

    from gate.model.load import load_drafter

    need_tools()
    model_dir, gguf, gate = tiny_target
    rc, err = export("--gate", gate, "--format", "eagle3", "--out", tmp_path / "out")
    assert rc == 0, err[-2000:]
    draft = tmp_path / "out" / "draft.gguf"
    assert draft.is_file()
    spec = speculative_simple(gguf, PROMPT, 48, draft=draft, threads=1, ctx=512, verbose=True)
    ref = plain_greedy(gguf, PROMPT, spec["n_predict"], threads=1, ctx=512)
    assert spec["text"] == ref["text"] and spec["n_predict"] == ref["n_predict"]     # greedy output kept
    assert spec["n_drafted"] > 0 and 0 <= spec["n_accept"] <= spec["n_drafted"]
    assert spec["stats"].startswith("draft-eagle3")
    # every drafted token is the head's own top-1 from the same context
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tok(PROMPT)["input_ids"]
    assert len(prompt_ids) == spec["n_prompt"]
    head = load_drafter(gate, None).head
    rows = target_rows(gguf, prompt_ids + generated(spec["rounds"]), head.layers)
    rounds = chain_drafts(head, rows, prompt_ids, spec["rounds"])
    assert sum(len(r["drafts"]) for r in spec["rounds"]) == spec["n_drafted"]
    checked = [(a, b) for theirs, mine, margins in rounds for a, b, m in zip(theirs, mine, margins) if m > 1e-3]
    assert len(checked) >= 0.9 * spec["n_drafted"] and all(a == b for a, b in checked), rounds
    print(f"\ntiny target: llama.cpp drafted {spec['n_drafted']}, accepted {spec['n_accept']} "
          f"({spec['accept_rate']}), {spec['tokens_per_pass']} tokens per target pass; {len(checked)} drafts "
          "compared with the head's own, all equal")


def test_converter_names_a_tokenizer_it_does_not_know(tmp_path, tiny_tokenizer):
    """The tiny test tokenizer is not one llama.cpp's converter knows: one error line, nothing written."""
    from gate.train.fit import fit

    model_dir, _, records = split_records(tmp_path, make_tiny_llama(len(tiny_tokenizer), layers=4), tiny_tokenizer,
                                          ("1", "2", "3"))
    fit(records, tmp_path / "eagle", log=lambda m: None, **{**FIT, "eagle_vocab": 64, "eagle_epochs": 1.0})
    rc, err = export("--gate", tmp_path / "eagle", "--out", tmp_path / "out")
    assert_one_error_line(rc, err, "pre-tokenizer was not recognized", start="train.py export: error: ")
    assert "--no-gguf skips this" in err and not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_real_smollm2_head_on_llamacpp(tmp_path):
    """The trained SmolLM2 head (runs/eagle3/gate, when training has written it) on the packaged GGUF: output
    identical to plain greedy, every draft the head's own, llama.cpp's acceptance printed."""
    from gate.model.load import load_drafter
    from runtimes.loading import load_tokenizer
    from runtimes.sources import packaged_gguf

    need_tools()
    if not (REAL_GATE / "drafter.json").is_file():
        pytest.skip(f"no trained feature head at {REAL_GATE} (train.py fit --drafter eagle writes one)")
    meta = json.loads((REAL_GATE / "drafter.json").read_text())
    if meta.get("format") != "skipgate-eagle/2" or len(meta.get("hidden_layer") or []) != 3:
        pytest.skip(f"{REAL_GATE} is not an EAGLE-3-shaped feature head ({meta.get('format')})")
    rc, err = export("--gate", REAL_GATE, "--out", tmp_path / "out")
    assert rc == 0, err[-2000:]
    gguf = packaged_gguf("smollm2-135m")[0]
    head, tok = load_drafter(REAL_GATE, None).head, load_tokenizer("smollm2-135m")
    prompts = ["The history of the printing press begins",
               "Once upon a time, in a small village by the sea, there lived"]
    for prompt in prompts:
        spec = speculative_simple(gguf, prompt, 64, draft=tmp_path / "out" / "draft.gguf", threads=2, ctx=1024,
                                  verbose=True)
        ref = plain_greedy(gguf, prompt, spec["n_predict"], threads=2, ctx=1024)
        assert spec["text"] == ref["text"], (spec["text"][-300:], ref["text"][-300:])
        assert spec["n_drafted"] > 0 and re.search(r"#acc tokens =\s+\d+", spec["stats"])
        ids = tok(prompt)["input_ids"]
        assert len(ids) == spec["n_prompt"]
        rows = target_rows(gguf, ids + generated(spec["rounds"]), head.layers)
        pairs = [(a, b) for theirs, mine, margins in chain_drafts(head, rows, ids, spec["rounds"])
                 for a, b, m in zip(theirs, mine, margins) if m > 1e-2]   # float32 in both; near-ties may flip
        assert len(pairs) >= 0.9 * spec["n_drafted"] and all(a == b for a, b in pairs)
        print(f"\nSmolLM2 + {REAL_GATE}: {prompt[:40]!r}: llama.cpp drafted {spec['n_drafted']}, accepted "
              f"{spec['n_accept']} ({spec['accept_rate']}), {spec['tokens_per_pass']} tokens per target pass; "
              f"{len(pairs)} drafts compared with the head's own, all equal; {spec['stats']}")
