"""infer.py --input/--output (gate/decode/batch.py): resumable batch decoding from a JSONL file.

The CLI runs in-process (main()) on a tiny random LLaMA saved as a local HF folder (context length 2,048),
greedy, so outputs are deterministic; one end-to-end case uses the real SmolLM2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.files import FolderLock
from gate.decode.cli import main

from helpers import call_main

PROMPTS = ["It is a truth universally", "My dear Mr. Bennet", "Netherfield Park is let", "Mr. Bennet replied"]


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
    assert set(full[0]) == {"id", "line", "prompt_ids", "output_ids", "text", "sources", "ledger", "input", "run"}
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
    text, ids = sorted(rows(out), key=lambda r: r["line"])   # rows come in the order prompts end
    assert 0 not in text["prompt_ids"] and len(text["output_ids"]) == 2
    assert ids["prompt_ids"] == [504, 3458] and len(ids["output_ids"]) == 1 and ids["id"] == 2


def test_runtime_checks_prompt_and_new_tokens_against_the_context(tiny_dir):
    """The one check behind infer.py (prompt, demo, batch lines) and bench/decode.py."""
    from runtimes.info import ContextLengthError
    from runtimes.open import open_models

    rt = open_models(str(tiny_dir), ["self:1"], "float32")
    rt.check_fits(2040, 8)
    with pytest.raises(ContextLengthError, match=r"^--prompt-tokens prompt \(2,041 tokens\) \+ --new-tokens 8: "
                                                 r"2,049 tokens, more than the 2,048 tokens"):
        rt.check_fits(2041, 8, "--prompt-tokens prompt", "--new-tokens")


# ------------------------------------------------------------------------------------------------ issue 22
def test_a_line_that_fails_while_decoding_is_an_error_row(tiny_dir, tmp_path, one_thread, capsys, monkeypatch):
    """Case 4: any exception while decoding one line is that line's error row (traceback on stderr, not in the
    file); the rest goes on, and a re-run tries the line again. A temperature below the floor is a bad line."""
    from gate.decode import batch

    real = batch.run_one

    def flaky(rt, policy, ids, args, **kw):
        if len(ids) == 3:   # the prompt_ids line below
            raise FloatingPointError("overflow in the softmax")
        return real(rt, policy, ids, args, **kw)

    monkeypatch.setattr(batch, "run_one", flaky)
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0]}, {"prompt_ids": [5, 6, 7]},
                                              {"prompt": PROMPTS[1], "temperature": 1e-300}, {"prompt": PROMPTS[2]}])
    out = tmp_path / "out.jsonl"
    assert run(tiny_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "FloatingPointError: overflow in the softmax" in err
    assert f"{inp}:2: decoding failed: FloatingPointError: overflow in the softmax (traceback on stderr)" in err
    assert f"{inp}:3: 'temperature' 1e-300 is below 0.0001" in err
    got = {r["line"]: r for r in rows(out)}
    assert sorted(got) == [1, 2, 3, 4] and "error" in got[2] and "error" in got[3]
    assert "Traceback" not in out.read_text() and len(got[4]["output_ids"]) == 6
    monkeypatch.setattr(batch, "run_one", real)
    assert run(tiny_dir, inp, out) == 2                          # line 2 now decodes; line 3 is still bad
    assert sorted((r["line"], "error" in r) for r in rows(out)) == [(1, False), (2, False), (3, True), (4, False)]


def test_resume_refuses_rows_of_another_line_or_run(tiny_dir, tmp_path, one_thread, capsys):
    """Case 5: a kept row must come from its own input line (hash) and this run's model, policy and settings;
    else one line names the difference and nothing is touched, or --rerun-mismatched runs those lines again."""
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    out = tmp_path / "out.jsonl"
    assert run(tiny_dir, inp, out) == 0
    before = out.read_bytes()
    for extra, expected in ((["--policy", "copy"], "policy 'big' (this run: 'copy')"),
                            (["-m", "7"], "max_new_tokens 6 (this run: 7)"),
                            (["-t", "0.5"], "temperature 0.0 (this run: 0.5)")):
        assert run(tiny_dir, inp, out, *extra) == 2
        assert expected in capsys.readouterr().err and out.read_bytes() == before
    write_lines(inp, [{"prompt": "A new first prompt"}] + [{"prompt": p} for p in PROMPTS[:3]])  # ids shift
    rc, err = call_main(main, ["--model", tiny_dir, "--input", inp, "--output", out, "-m", "6"])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert (f"--output {out}: 3 rows do not match this run's input and settings, first row 1 (id 1): input line 1 "
            "is not the line it was made from") in errors[0] and "--rerun-mismatched" in errors[0]
    assert out.read_bytes() == before
    assert run(tiny_dir, inp, out, "--rerun-mismatched") == 0
    assert "removing 3 rows of another line or run" in capsys.readouterr().err
    fresh = tmp_path / "fresh.jsonl"
    assert run(tiny_dir, inp, fresh) == 0
    key = lambda r: r["id"]   # noqa: E731
    assert [(r["id"], r["output_ids"]) for r in sorted(rows(out), key=key)] == \
        [(r["id"], r["output_ids"]) for r in sorted(rows(fresh), key=key)]


def test_a_symlinked_output_is_resumed_through_the_link(tiny_dir, tmp_path, one_thread):
    """Case 3: the repair rewrites the real file; the link stays a link and keeps receiving rows."""
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    (tmp_path / "real").mkdir()
    real, link = tmp_path / "real" / "out.jsonl", tmp_path / "out.jsonl"
    assert run(tiny_dir, inp, real) == 0
    whole = real.read_text().splitlines(keepends=True)
    real.write_text(whole[0] + whole[1][:10])                   # one row and a partial one
    link.symlink_to(real)
    assert run(tiny_dir, inp, link) == 0
    assert link.is_symlink() and sorted(r["id"] for r in rows(real)) == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "real")) == ["out.jsonl", "out.jsonl.summary.json"]   # no temporary file


def test_dash_reads_stdin_and_streams_to_stdout(tiny_dir, tmp_path, one_thread, capfd, monkeypatch):
    """Minor: --input - reads stdin, --output - streams the rows to stdout (no file named '-', no lock)."""
    import io

    data = "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]).encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(tiny_dir), "--input", "-", "--output", "-", "-m", "3"]) == 0
    got = capfd.readouterr()
    streamed = [json.loads(line) for line in got.out.splitlines()]
    assert [r["id"] for r in streamed] == [1, 2] and all(len(r["output_ids"]) == 3 for r in streamed)
    assert "2 prompts in stdin: 0 already in stdout, 2 to run" in got.err
    assert os.listdir(tmp_path) == []
