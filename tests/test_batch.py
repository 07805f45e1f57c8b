"""infer.py --input/--output (gate/decode/batch.py): resumable batch decoding from a JSONL file.

The CLI runs in-process (main()) on a tiny random LLaMA saved as a local HF folder (context length 2,048),
greedy, so outputs are deterministic; one end-to-end case uses the real SmolLM2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.files import FileLock, FolderLock
from gate.decode.cli import main

from helpers import assert_one_error_line, call_main, unwritable

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


# ------------------------------------------------------------------------------------------------ issue 29
def test_one_output_file_holds_one_run(tiny_dir, tmp_path, one_thread, capsys):
    """Case 1: every row already in the output is checked against this run, not only those whose ids are lines
    of this input: rows of another run are refused even with --rerun-mismatched (their lines are not here to
    make them again); rows of the same run from another input file are kept."""
    abc = write_lines(tmp_path / "abc.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    d = write_lines(tmp_path / "d.jsonl", [{"id": "d", "prompt": PROMPTS[3]}])
    res = tmp_path / "res.jsonl"
    assert run(tiny_dir, abc, res) == 0
    before = res.read_bytes()
    for extra in ([], ["--rerun-mismatched"]):
        rc, err = call_main(main, ["--model", tiny_dir, "--input", d, "--output", res, "-m", "6", "--policy", "copy",
                                   *extra])
        assert_one_error_line(rc, err, f"--output {res}: 3 rows of another run, for ids that are no line of this "
                              "input, first row 1 (id 1): policy 'big' (this run: 'copy'); one output file holds one "
                              "run: name a new --output", "infer.py: error: ")
        assert res.read_bytes() == before
    assert run(tiny_dir, d, res) == 0                       # the same run, another input file: added
    assert [r["id"] for r in rows(res)] == [1, 2, 3, "d"] and res.read_bytes().startswith(before)


def test_duplicate_rows_keep_the_first(tiny_dir, tmp_path, one_thread, capsys):
    """Case 4: an output holding an id's row twice keeps the first and says so (docs/batch.md)."""
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    out = tmp_path / "out.jsonl"
    assert run(tiny_dir, inp, out) == 0
    once = out.read_text()
    out.write_text(once + once)
    capsys.readouterr()
    assert run(tiny_dir, inp, out) == 0
    err = capsys.readouterr().err
    assert "removing 3 rows repeating an earlier row's id (an id's first row is kept)" in err and "3 already in" in err
    assert out.read_text() == once


def test_the_summary_describes_the_whole_file(tiny_dir, tmp_path, one_thread):
    """Case 7: OUTPUT.summary.json counts every row of the file; the last invocation is under last_run."""
    out = tmp_path / "out.jsonl"
    assert run(tiny_dir, write_lines(tmp_path / "a.jsonl", [{"prompt": p} for p in PROMPTS[:2]]), out) == 0
    assert run(tiny_dir, write_lines(tmp_path / "b.jsonl", [{"prompt": p} for p in PROMPTS[:3]] +
                                     [{"prompt": "x", "seed": -1}]), out) == 2
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    held = rows(out)
    assert (summary["prompts"], summary["results"], summary["errors"]) == (len(held), 3, 1) == (4, 3, 1)
    assert summary["tokens"] == sum(len(r["output_ids"]) for r in held if "error" not in r) == 18
    last = summary["last_run"]
    assert (last["prompts"], last["results"], last["errors"], last["tokens"]) == (2, 1, 1, 6)
    assert last["tokens_per_s"] > 0 and last["parallel"] == 1


def test_null_options_and_repeated_keys_are_bad_lines(tiny_dir, tmp_path, one_thread, capsys):
    """Cases 8 and 14: null is no value (an error row, not a TypeError that stops the batch nor a traceback in a
    row); a key given twice on a line is refused (json.loads kept the last); an explicit --audit refuses a
    sampled line as it refuses -t > 0; a line without an id whose number is an earlier line's explicit id says
    the id was its line number (case 13)."""
    inp = write_lines(tmp_path / "in.jsonl", [
        {"prompt": PROMPTS[0], "max_new_tokens": None},
        {"prompt": PROMPTS[1], "temperature": None},
        {"id": 2, "prompt": PROMPTS[2]},
        '{"prompt": "a", "prompt": "b"}',
        {"prompt": PROMPTS[3]},
        {"prompt": PROMPTS[3], "seed": -1},
        {"prompt": PROMPTS[3], "seed": None},
    ])
    out = tmp_path / "out.jsonl"
    assert run(tiny_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "TypeError" not in err
    expected = {1: "'max_new_tokens' must be an integer >= 1, got None",
                2: "'temperature' must be a finite number >= 0, got None",
                3: "id 2 repeats line 2's (its line number: the line has no \"id\")",
                4: "key 'prompt' appears twice (which one was meant? give each key once)",
                6: "'seed' must be an integer in [0, 2**63), got -1",
                7: "'seed' must be an integer in [0, 2**63), got None"}
    for n, text in expected.items():
        assert f"{inp}:{n}: {text}" in err, (n, err[-3000:])
    got = {r["line"]: r for r in rows(out)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7] and "error" not in got[5] and len(got[5]["output_ids"]) == 6
    assert all(text in got[n]["error"] for n, text in expected.items())
    assert "Traceback" not in out.read_text()
    sampled = write_lines(tmp_path / "s.jsonl", [{"prompt": PROMPTS[0], "temperature": 0.7}, {"prompt": PROMPTS[1]}])
    assert run(tiny_dir, sampled, tmp_path / "s_out.jsonl", "--policy", "gate", "--small", "self:1", "--audit") == 2
    assert (f"{sampled}:1: 'temperature' 0.7: --audit compares skips with the big model's greedy token: it needs "
            "temperature 0 (as it needs -t 0 on the command line)") in capsys.readouterr().err
    assert [("error" in r) for r in rows(tmp_path / "s_out.jsonl")] == [True, False]


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tiny_dir, tmp_path, capsys):
    """Case 9: an existing output that cannot be opened for writing (chattr +i) is refused before the model
    loads, nothing touched; an output name of 240 bytes works (its lock and temporary names are shortened)."""
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1]}])
    out = tmp_path / "frozen.jsonl"
    out.write_text("")
    with unwritable(out):
        rc, err = call_main(main, ["--model", tmp_path / "no_model", "--input", inp, "--output", out])
        assert_one_error_line(rc, err, f"--output {out}: cannot be written (", "infer.py: error: ")
    assert out.read_text() == "" and sorted(os.listdir(tmp_path)) == ["frozen.jsonl", "in.jsonl"]
    long = tmp_path / ("r" * 240)
    assert run(tiny_dir, inp, long) == 0
    lines = long.read_text().splitlines(keepends=True)
    long.write_text(lines[0] + lines[1][:7])          # a partial last line: the repair writes a temporary file
    assert run(tiny_dir, inp, long) == 0 and len(rows(long)) == 2
    assert sorted(os.listdir(tmp_path)) == ["frozen.jsonl", "in.jsonl", long.name, long.name + ".summary.json"]


def test_a_hard_link_to_a_busy_output_is_refused(tiny_dir, tmp_path, one_thread, capsys):
    """Case 3: a second run through a hard link to the output (another path, the same inode) is refused; and a
    run that is refused creates no empty output (case 13)."""
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0]}])
    out, link = tmp_path / "out.jsonl", tmp_path / "link.jsonl"
    assert run(tiny_dir, inp, out) == 0
    os.link(out, link)
    before = out.read_bytes()
    with FileLock(out, "infer.py --output out.jsonl (the first run)"):
        rc, err = call_main(main, ["--model", tiny_dir, "--input", inp, "--output", link, "-m", "6"])
        assert_one_error_line(rc, err, "writing the same file under another name (a hard link: device ",
                              "infer.py: error: ")
    assert out.read_bytes() == before and link.read_bytes() == before
    rc, err = call_main(main, ["--model", tiny_dir, "--input", inp, "--output", tmp_path / "new.jsonl",
                               "--parallel", "2", "--backend", "hf"])
    assert_one_error_line(rc, err, "--parallel 2: prompts share a pass only on llama.cpp", "infer.py: error: ")
    assert not (tmp_path / "new.jsonl").exists()


def test_parallel_messages_go_to_stderr(tiny_dir, tmp_path, one_thread, capfd, monkeypatch):
    """Case 5: what the side-by-side run says (the slot's draft cost, ...) goes to stderr; stdout holds only
    rows. The slots are stood in for (the real run: test_parallel_stream_is_rows_only, on llama.cpp)."""
    from gate.decode import batch
    from gate.decode.session import make_policy

    def fake_parallel(rt, lines, n, slot_ctx, args, policies, row_of, emit, log):
        log("parallel: one draft token costs a slot 0.91 of its one-token share of a pass")
        policy = make_policy(args, rt, policies)
        for line in lines:
            emit(line, row_of(rt, policy, line))
        return dict(parallel=n)

    monkeypatch.setattr(batch, "parallel_slots", lambda rt, todo, args: 2)
    monkeypatch.setattr(batch, "run_parallel", fake_parallel)
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    assert main(["--model", tiny_dir, "--input", str(inp), "--output", "-", "-m", "3"]) == 0
    got = capfd.readouterr()
    assert [json.loads(line)["id"] for line in got.out.splitlines()] == [1, 2]     # rows only
    assert "parallel: one draft token costs a slot 0.91" in got.err


def test_an_interrupt_saves_the_finished_rows_and_says_how_to_resume(tiny_dir, tmp_path, one_thread, capsys,
                                                                     monkeypatch):
    """Case 12: Ctrl-C (KeyboardInterrupt) in the middle of a batch: exit status 130, no traceback, one message
    naming what was saved and how to resume; the same command then runs the rest, each prompt once."""
    from gate.decode import batch

    real, calls = batch.run_one, []

    def interrupted(rt, policy, ids, args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(rt, policy, ids, args, **kw)

    monkeypatch.setattr(batch, "run_one", interrupted)
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    rc, err = call_main(main, ["--model", tiny_dir, "--input", inp, "--output", out, "-m", "6"])
    assert rc == 130 and "Traceback" not in err and "error:" not in err, err[-2000:]
    assert (f"infer.py: interrupted: 2 of the 4 prompts of this run saved in {out} (2 rows in it); run the same "
            "command again to resume the other 2") in err
    assert [r["id"] for r in rows(out)] == [1, 2] and not (tmp_path / ".out.jsonl.lock").exists()
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["prompts"] == 2
    monkeypatch.setattr(batch, "run_one", real)
    assert run(tiny_dir, inp, out) == 0
    assert [r["id"] for r in rows(out)] == [1, 2, 3, 4]


def test_a_closed_stdout_ends_quietly(tiny_dir, tmp_path, one_thread, capfd, monkeypatch):
    """Case 12: `infer.py ... --output - | head -c 20`: the reader went away (BrokenPipeError on the next row):
    no traceback, no message, exit status 141 (128 + SIGPIPE, as a shell reports such a pipe); the real pipe:
    test_the_script_itself_is_interrupted_cleanly."""
    from gate.decode import batch

    real = batch.append_row

    def closed(fd, row, sync=True):
        if not sync:                                  # the stream to stdout
            raise BrokenPipeError(32, "Broken pipe")
        return real(fd, row, sync)

    monkeypatch.setattr(batch, "append_row", closed)
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    assert main(["--model", str(tiny_dir), "--input", str(inp), "--output", "-", "-m", "3"]) == 141
    err = capfd.readouterr().err
    assert "Traceback" not in err and "error" not in err and "Broken" not in err, err[-2000:]


def test_json_dash_is_stdout(tiny_dir, one_thread, capfd):
    """Case 14: --json - writes the JSON to stdout, as '-' means everywhere else (the text is not streamed
    beside it: it is in the JSON; said on stderr)."""
    assert main(["--model", str(tiny_dir), "Once upon", "-m", "3", "--json", "-"]) == 0
    got = capfd.readouterr()
    r = json.loads(got.out)
    assert len(r["output_ids"]) == 3 and r["prompt"] == "Once upon"
    assert "--json -: the JSON goes to stdout in place of the streamed text" in got.err


@pytest.mark.slow   # fresh interpreters importing torch: seconds each
def test_the_script_itself_is_interrupted_cleanly(tiny_dir, tmp_path):
    """Case 12 as a user meets it: SIGINT (Ctrl-C, `timeout -s INT`) in the middle of a batch, and stdout closed
    by `| head -c 20`: no traceback either way; the interrupted run resumes with each prompt once."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    inp = write_lines(tmp_path / "in.jsonl", [{"prompt": f"{p} {i}"} for i in range(50) for p in PROMPTS[:1]])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "infer.py", "--model", str(tiny_dir), "--input", str(inp), "-m", "40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd + ["--output", str(out)], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and "Traceback" not in err and "run the same command again to resume" in err, err
    assert subprocess.run(cmd + ["--output", str(out)], cwd=root, env=env, capture_output=True).returncode == 0
    assert sorted(r["id"] for r in rows(out)) == list(range(1, 51))
    p = subprocess.Popen(cmd + ["--output", "-"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = p.stdout.read(20)
    p.stdout.close()                                   # `| head -c 20`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert len(head) == 20 and p.returncode == 141 and "Traceback" not in err and "Broken" not in err, err[-2000:]
