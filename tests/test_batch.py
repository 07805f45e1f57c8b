"""infer.py --input/--output (gate/decode/batch.py): resumable batch decoding from a JSONL file.

The CLI runs in-process (main()) on a tiny random LLaMA saved as a local HF folder (context length 2,048),
greedy, so outputs are deterministic; one end-to-end case uses the real SmolLM2.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_llama, make_tiny_tokenizer
from corpus_tools.files import FolderLock
from gate.decode.cli import main

PROMPTS = ["It is a truth universally", "My dear Mr. Bennet", "Netherfield Park is let", "Mr. Bennet replied"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tiny_dir, inp: Path, out: Path, *extra: str) -> int:
    return main(["--model", str(tiny_dir), "--input", str(inp), "--output", str(out), "-m", "6", *extra])


def test_resume_after_a_kill_gives_each_prompt_once(tiny_dir, tmp_path, one_thread, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:3]] +
                      [{"id": "last", "prompt_ids": [5, 6, 7], "max_new_tokens": 3}])
    whole = tmp_path / "whole.jsonl"
    assert run(tiny_dir, inp, whole) == 0
    full = rows(whole)
    assert [r["id"] for r in full] == [1, 2, 3, "last"] and len(full[3]["output_ids"]) == 3
    assert all(len(r["output_ids"]) == 6 and r["ledger"]["new_tokens"] == 6 for r in full[:3])
    assert set(full[0]) == {"id", "line", "prompt_ids", "output_ids", "text", "sources", "ledger"}
    lines = whole.read_text().splitlines(keepends=True)
    killed = tmp_path / "killed.jsonl"
    killed.write_text(lines[0] + lines[1] + lines[2][:len(lines[2]) // 2])   # two rows and half a row
    capsys.readouterr()
    assert run(tiny_dir, inp, killed) == 0
    err = capsys.readouterr().err
    assert "removing a partial last line" in err and "2 already in" in err and "2 to run" in err
    resumed = rows(killed)
    assert sorted(map(str, (r["id"] for r in resumed))) == sorted(map(str, (r["id"] for r in full)))
    by_id = {r["id"]: r for r in resumed}
    assert all(by_id[r["id"]]["output_ids"] == r["output_ids"] for r in full)    # same as uninterrupted
    assert run(tiny_dir, inp, killed) == 0 and rows(killed) == resumed            # all done: nothing changes


def test_bad_lines_are_error_rows_and_the_rest_goes_on(tiny_dir, tmp_path, one_thread, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [
        {"prompt": PROMPTS[0]},
        "not json {",
        {"prompt": "x", "max_tokens": 3},
        {"prompt_ids": [5] * 2100},                      # longer than the tiny model's 2,048-token context
        {"prompt_ids": [5, 10 ** 6]},
        {"prompt": PROMPTS[1], "max_new_tokens": 0},
        {"id": 1, "prompt": "a repeated id"},
        [1, 2],
        {"prompt": PROMPTS[2], "temperature": 0.8, "seed": 3, "id": "sampled"},
        {"prompt": "Caf\udce9"},                           # a JSON escape that is no character (case 9)
    ])
    out = tmp_path / "out.jsonl"
    assert run(tiny_dir, inp, out) == 2
    err = capsys.readouterr().err
    expected = {2: "not JSON", 3: "unknown key 'max_tokens'", 4: "prompt (2,100 tokens) + -m 6: 2,106 tokens, "
                "more than the 2,048 tokens", 5: "'prompt_ids': 1000000 is not a token id of this tokenizer",
                6: "'max_new_tokens' must be an integer >= 1", 7: "id 1 repeats line 1's", 8: "not a JSON object",
                10: "'prompt': not UTF-8 text (lone surrogate '\\udce9' at character 4)"}
    for n, text in expected.items():
        assert f"{inp}:{n}: {text}" in err, (n, err)
    assert err.strip().splitlines()[-1].startswith(f"infer.py: error: 8 of 10 lines of {inp} were bad")
    got = {r["line"]: r for r in rows(out)}
    assert sorted(got) == list(range(1, 11))
    assert all(text in got[n]["error"] for n, text in expected.items())
    assert "error" not in got[1] and got[9]["id"] == "sampled" and len(got[9]["output_ids"]) == 6
    assert "new tokens        12 (2 runs)" in err                                    # the summary ledger
    assert run(tiny_dir, inp, out) == 2                                               # error rows are retried
    again = rows(out)
    assert len(again) == 10 and [r["line"] for r in again[:2]] == [1, 9]
    assert again[1]["output_ids"] == got[9]["output_ids"]                             # seeded sampling: kept


def test_every_policy_in_a_batch_verify_is_big(tiny_dir, tmp_path, one_thread):
    """One policy object for all prompts; the Decoder resets per prompt, so each output is big's own."""
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": " ".join([p] * 3)} for p in PROMPTS])
    outputs = {}
    for name, extra in [("big", []), ("copy", ["--policy", "copy", "--min-match", "2", "--verify"]),
                        ("entropy", ["--policy", "entropy", "--small", "self:1", "--tau", "0.9", "--verify"])]:
        assert run(tiny_dir, inp, tmp_path / f"{name}.jsonl", "-m", "12", *extra) == 0
        outputs[name] = [r["output_ids"] for r in rows(tmp_path / f"{name}.jsonl")]
    assert outputs["copy"] == outputs["big"] == outputs["entropy"]


def test_empty_input_is_a_clear_message(tiny_dir, tmp_path, capsys):
    inp = write_lines(tmp_path / "in.jsonl", ["", "  "])
    assert run(tiny_dir, inp, tmp_path / "out.jsonl") == 2
    assert capsys.readouterr().err == (f"infer.py: error: --input {inp}: no prompts (the file is empty; write one "
                                       'JSON object a line, e.g. {"prompt": "Once upon a time"})\n')
    assert not (tmp_path / "out.jsonl").exists()


def test_two_writers_are_refused(tiny_dir, tmp_path, one_thread, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0]}])
    out = tmp_path / "out.jsonl"
    with FolderLock(tmp_path, "infer.py --output out.jsonl (the first run)", name=".out.jsonl.lock"):
        assert run(tiny_dir, inp, out) == 2
        err = capsys.readouterr().err
        assert "in use by infer.py --output out.jsonl (the first run) (pid " in err and not out.exists()
        assert run(tiny_dir, inp, tmp_path / "other.jsonl") == 0    # another output in the same folder: free
    assert run(tiny_dir, inp, out) == 0 and not (tmp_path / ".out.jsonl.lock").exists()


def test_an_output_that_is_not_ours_is_left_alone(tiny_dir, tmp_path, capsys):
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0]}])
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\n")
    assert run(tiny_dir, inp, out) == 2
    assert "line 1 is not a result row of infer.py --input; refusing to touch it" in capsys.readouterr().err
    assert out.read_text() == "my notes\n"


def test_smollm2_end_to_end(smollm2, tmp_path, capsys):
    """The real model: text prompts are literal (a typed special token stays text), ids pass as given."""
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": "Hi<|endoftext|>", "id": "text"},
                                              {"prompt_ids": [504, 3458], "max_new_tokens": 1}])
    out = tmp_path / "out.jsonl"
    assert main(["--input", str(inp), "--output", str(out), "-m", "2"]) == 0
    text, ids = rows(out)
    assert 0 not in text["prompt_ids"] and len(text["output_ids"]) == 2
    assert ids["prompt_ids"] == [504, 3458] and len(ids["output_ids"]) == 1 and ids["id"] == 2


def test_runtime_checks_prompt_and_new_tokens_against_the_context(tiny_dir):
    """The one check behind infer.py (prompt, demo, batch lines) and bench/decode.py."""
    from corpus_tools.models import ContextLengthError
    from gate.decode.runtime import open_models

    rt = open_models(str(tiny_dir), ["self:1"], "float32")
    rt.check_fits(2040, 8)
    with pytest.raises(ContextLengthError, match=r"^--prompt-tokens prompt \(2,041 tokens\) \+ --new-tokens 8: "
                                                 r"2,049 tokens, more than the 2,048 tokens"):
        rt.check_fits(2041, 8, "--prompt-tokens prompt", "--new-tokens")
