"""`infer.py --input prompts.jsonl --output results.jsonl`: many prompts, one model load, resumable.

A line is {"prompt": text} or {"prompt_ids": [...]} with optional id, max_new_tokens, temperature, seed; unknown
or repeated keys, null values and repeated ids are refused. Each result row (id, line, prompt_ids, output_ids, text,
sources, ledger, input hash, run identity) is appended with one fsynced write as its prompt ends; a bad line or one
whose decoding fails is an error row and the rest goes on (exit status 2). A re-run checks every row of the
output against this run (one file is one run): it skips ids with a row of the same line and run, refuses rows of
another (or reruns them: --rerun-mismatched), keeps an id's first row only, retries error rows and drops a
partial last line. Every path the run writes is checked before any work, and the output is locked under every
name of it (common/files.py FileLock). Ctrl-C keeps every finished row and says how to resume (exit status 130).
--parallel N decodes N prompts side by side on llama.cpp (gate/decode/parallel.py); under `accelerate launch`
each process takes every P-th line into its own part file, merged into the output at the end. A summary of the
file (rows, tokens, big calls per token, errors) and of the last run (tokens/s) goes to OUTPUT.summary.json.
Details and the reasons: docs/batch.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

from tqdm import tqdm

from common.errors import INTERRUPTED, ProjectError, UsageError, one_line
from common.files import FileLock, OutputPathError, check_output_file, write_json, write_text
from gate.decode.cost import batch_curve
from gate.decode.ledger import Ledger, format_ledgers, policy_label, sum_ledgers
from gate.decode.parallel import choose_parallel, run_parallel, slot_context
from gate.decode.registry import namespace
from gate.decode.session import (
    audits,
    backend_of,
    encode,
    make_policy,
    open_runtime,
    option_problem,
    run_one,
    user_text,
)
from gate.model.artifact import artifact_digest
from runtimes.info import tokenizer_fingerprint
from runtimes.llamacpp import LlamaCppBackend
from runtimes.loading import load_tokenizer

OPTIONS = ("max_new_tokens", "temperature", "seed")   # per line; defaults: -m, -t, --seed
KEYS = ("id", "prompt", "prompt_ids", *OPTIONS)
RUN_ARGS = ("model", "dtype", "backend", "policy", "verify", "verify_below", "chat", "parse_special", "check")


@dataclass
class Line:
    """One prompt of the input file: its parsed object, or why it is bad."""
    number: int
    id: object
    obj: dict | None = None
    error: str | None = None
    repeated: bool = False   # its id is an earlier line's: reported on every run, whatever the output holds
    digest: str = ""         # hash of the line's bytes: a kept row must have been made from this very line
    need: int = 0            # tokens of context it needs: prompt + new tokens (parallel_slots)

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value) -> str:
    return json.dumps(value, ensure_ascii=False)   # "1" and 1 are different ids


# -- input -----------------------------------------------------------------------------------------------------
def read_input(path: str) -> list[Line]:
    """The prompts of --input ('-': stdin), each checked as far as that needs no tokenizer (done before loading
    a model)."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"--input {path}: {e.strerror or e}") from None
    lines, seen = [], {}
    for number, data in enumerate(raw.split(b"\n"), 1):
        if data.strip():
            line = parse_line(number, data)
            line.digest = hashlib.sha256(data.strip()).hexdigest()[:16]
            if line.error is None and line.key in seen:
                first = seen[line.key]
                line.repeated = True
                line.error = (f"id {line.id!r}{default_id(line)} repeats line {first.number}'s{default_id(first)} "
                              "(ids must be unique: resuming goes by id)")
            seen.setdefault(line.key, line)
            lines.append(line)
    if not lines:
        raise UsageError(f"--input {path}: no prompts (the file is empty; write one JSON object a line, "
                         'e.g. {"prompt": "Once upon a time"})')
    return lines


def default_id(line: Line) -> str:
    """' (its line number: ...)' where the line's id is its line number because it gives none, else ''."""
    return "" if line.obj is None or "id" in line.obj else ' (its line number: the line has no "id")'


class RepeatedKey(ValueError):
    """A key that appears twice in one JSON object (json.loads would keep the last in silence)."""


def unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: the object, or RepeatedKey naming the first key given twice."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise RepeatedKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return dict(pairs)


def parse_line(number: int, data: bytes) -> Line:
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys)
    except UnicodeDecodeError as e:
        return Line(number, number, error=f"not UTF-8 text ({e.reason} at byte {e.start})")
    except RepeatedKey as e:
        return Line(number, number, error=f"key {e.args[0]!r} appears twice (which one was meant? give each key once)")
    except ValueError as e:
        return Line(number, number, error=f"not JSON ({e})")
    if not isinstance(obj, dict):
        return Line(number, number, error=f"not a JSON object but {type(obj).__name__} (write one object a line)")
    ident = obj.get("id", number)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        return Line(number, number, error=f"id must be a string or an integer, got {ident!r}")
    return Line(number, ident, obj, error=check_fields(obj))


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(obj: dict) -> str | None:
    """Why the object is not a prompt (None: it is one, up to its tokens)."""
    unknown = [k for k in obj if k not in KEYS]
    if unknown:
        return f"unknown key {unknown[0]!r} (known: {', '.join(KEYS)})"
    if ("prompt" in obj) == ("prompt_ids" in obj):
        return "give exactly one of 'prompt' (text) and 'prompt_ids' (a list of token ids)"
    if "prompt" in obj and not (isinstance(obj["prompt"], str) and obj["prompt"]):
        return f"'prompt' must be a non-empty string, got {obj['prompt']!r:.60}"
    ids = obj.get("prompt_ids", [0])
    if not (isinstance(ids, list) and ids and all(is_int(i) for i in ids)):
        return f"'prompt_ids' must be a non-empty list of integers, got {ids!r:.60}"
    for k in OPTIONS:   # the rule of -m / -t / --seed; null is no value (the option's default is: leave it out)
        problem = option_problem(k, obj[k]) if k in obj else None
        if problem:
            return f"'{k}' {problem}"
    return None


def prompt_ids_of(rt, line: Line, args) -> list[int]:
    """The line's prompt ids (text encoded as user text, ids checked against the vocabulary), checked to fit the
    context with its max_new_tokens, and its options against the run's (an explicit --audit needs a greedy
    line, as it needs -t 0); UsageError / ContextLengthError say what is wrong."""
    obj = line.obj
    if getattr(args, "audit", None) and obj.get("temperature", 0) > 0:
        raise UsageError(f"'temperature' {obj['temperature']!r}: --audit compares skips with the big model's greedy "
                         "token: it needs temperature 0 (as it needs -t 0 on the command line)")
    if "prompt" in obj:
        ids = encode(rt, user_text(obj["prompt"], "'prompt'", from_bytes=False), args.chat, args.parse_special)
    else:
        n = len(rt.tokenizer)
        bad = next((i for i in obj["prompt_ids"] if not 0 <= i < n), None)
        if bad is not None:
            raise UsageError(f"'prompt_ids': {bad} is not a token id of this tokenizer (0..{n - 1})")
        ids = list(obj["prompt_ids"])
    m = obj.get("max_new_tokens", args.max_new_tokens)
    rt.check_fits(len(ids), m, "prompt", "max_new_tokens" if "max_new_tokens" in obj else "-m")
    return ids


# -- output ----------------------------------------------------------------------------------------------------
def run_identity(args, policies) -> dict:
    """What decides a row's output besides its input line: the models, the policy and the options it reads, the
    decoding settings (JSON-normalised, so it compares equal to a row read back). The tokenizer's fingerprint and
    each line's max_new_tokens / temperature / seed are added per row (line_identity)."""
    cls = policies.get(args.policy)
    names = [*RUN_ARGS, *(a.dest for a in getattr(cls, "args", ()))]
    run = {k: getattr(args, k, None) for k in dict.fromkeys(names)}
    run = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in run.items()}
    if run.get("gate"):   # the artifact itself, not only its path: a recalibration in place changes it
        run["gate_sha256"] = artifact_digest(run["gate"])
    return json.loads(json.dumps(run, default=str))


def line_identity(run: dict, line: Line | None, args, tokenizer: str | None) -> dict:
    """The run's identity for one line: its effective options and the tokenizer (no line: what every row of
    this run shares, whatever its line)."""
    opts = {k: line.obj.get(k, getattr(args, k)) for k in OPTIONS} if line and line.obj else {}
    return json.loads(json.dumps({**run, **opts, "tokenizer": tokenizer}))


def big_tokenizer(args, policies) -> str:
    """The fingerprint of the run's big model's tokenizer, read without its weights."""
    try:
        big, _ = policies[args.policy].model_names(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return tokenizer_fingerprint(load_tokenizer(big))


def mismatch(row: dict, line: Line | None, want: dict) -> str | None:
    """Why a kept row was not made from `line` by this run (line None: its id is no line of this input, and
    only what every row of the run shares is compared), or None."""
    if "input" not in row or "run" not in row:
        return "made by an older infer.py (no input hash)"
    if line is not None and row["input"] != line.digest:
        return f"input line {line.number} is not the line it was made from"
    got = row["run"] if isinstance(row["run"], dict) else {}
    diff = [k for k in want if got.get(k) != want[k]]
    return ", ".join(f"{k} {got.get(k)!r} (this run: {want[k]!r})" for k in diff[:3]) or None


def rows_text(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def repair_output(path: Path, lines: list[Line], want, rerun: bool) -> set[str]:
    """The ids (keys) with a result row of their own line and this run (want(line): its identity; want(None):
    what every row of the run shares) in the output. Every row is checked, not only those of this input's ids:
    one file is one run. A partial last line, error rows and an id's later rows (duplicates: its first row is
    kept) are removed; a row of another line or run is refused (UsageError naming what differs) or, with
    `rerun`, removed when its line is in this input (else it is refused: it could not be made again)."""
    if not path.exists():
        return set()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"--output {path}: cannot read it to resume ({e.strerror or e})") from None
    *whole, tail = raw.split(b"\n")
    by_key = {line.key: line for line in lines if not line.repeated}
    keep, done, errors, wrong, foreign, repeats = [], set(), 0, [], [], 0
    for number, data in enumerate(whole, 1):
        row = result_row(path, number, data)
        if row is None:
            continue
        if "error" in row:
            errors += 1
            continue
        key = id_key(row["id"])
        line = by_key.get(key)
        why = mismatch(row, line, want(line))
        if why:
            (wrong if line else foreign).append(f"row {number} (id {row['id']!r}): {why}")
            if rerun:
                continue
        if key in done:
            repeats += 1
            continue
        done.add(key)
        keep.append(data.decode("utf-8") + "\n")
    if foreign:
        raise UsageError(f"--output {path}: {rows_text(len(foreign))} of another run, for ids that are no line of "
                         f"this input, first {foreign[0]}; one output file holds one run: name a new --output")
    if wrong and not rerun:
        raise UsageError(f"--output {path}: {rows_text(len(wrong))} do not match this run's input and settings, "
                         f"first {wrong[0]}; name a new --output, or add --rerun-mismatched to run those lines again")
    dropped = ["a partial last line (an interrupted run)"] * bool(tail)
    dropped += [f"{errors} error row{'s' * (errors > 1)} (those lines are tried again)"] * bool(errors)
    dropped += [f"{rows_text(len(wrong))} of another line or run (--rerun-mismatched)"] * bool(wrong)
    dropped += [f"{rows_text(repeats)} repeating an earlier row's id (an id's first row is kept)"] * bool(repeats)
    if dropped:
        print(f"infer.py: {path}: removing {', '.join(dropped)}", file=sys.stderr)
        write_text(path, "".join(keep))
    return done


def result_row(path: Path, number: int, data: bytes) -> dict | None:
    """A row of a results file (None: a blank line); anything else means the file is not ours."""
    if not data.strip():
        return None
    try:
        row = json.loads(data.decode("utf-8"))
    except ValueError:
        row = None
    if not (isinstance(row, dict) and "id" in row and ("error" in row or "output_ids" in row)):
        raise UsageError(f"--output {path}: line {number} is not a result row of infer.py --input; refusing to "
                         "touch it (name a new file, or a results file of an earlier run to resume it)")
    return row


def append_row(fd: int, row: dict, sync: bool = True) -> None:
    """One row, appended with one write (a kill leaves at most a partial last line) and made durable (`sync`;
    not for a pipe)."""
    data = memoryview((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    while data:
        data = data[os.write(fd, data):]
    if sync:
        os.fsync(fd)


# -- the run ---------------------------------------------------------------------------------------------------
def run_line(rt, policy, line: Line, args, run: dict) -> dict:
    """The output row of one line: its result (with its input hash and run identity), or its error."""
    if line.error is None:
        try:
            ids = prompt_ids_of(rt, line, args)
        except ProjectError as e:
            line.error = one_line(e)
    if line.error is not None:
        return dict(id=line.id, line=line.number, error=line.error)
    opts = {k: line.obj[k] for k in OPTIONS if k in line.obj}
    r = run_one(rt, policy, ids, namespace(args, **opts))
    return dict(id=line.id, line=line.number, **{k: r[k] for k in ("prompt_ids", "output_ids", "text", "sources",
                                                                 "ledger")},
                input=line.digest, run=line_identity(run, line, args, rt.big_info.fingerprint))


def safe_row(rt, policy, line: Line, args, run: dict) -> dict:
    """run_line, with any exception while decoding the line turned into its error row (the traceback goes to
    stderr): one line that fails never stops the batch, nor every re-run."""
    try:
        return run_line(rt, policy, line, args, run)
    except Exception as e:   # a bug or a numerical failure on this line alone; KeyboardInterrupt passes
        print(f"infer.py: {input_name(args)}:{line.number}: decoding failed:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return dict(id=line.id, line=line.number, error=f"decoding failed: {type(e).__name__}: {one_line(e)} "
                    "(traceback on stderr)")


def input_name(args) -> str:
    return "stdin" if args.input == "-" else args.input


def run_lines(rt, policy, todo: list[Line], args, run: dict, policies, lock: FileLock | None = None,
              saved: list | None = None) -> tuple[list, int, dict]:
    """Every line in `todo`, each row appended to --output (or streamed to stdout: '-') as it finishes, one prompt
    at a time or --parallel N side by side; (ledgers, bad lines, what the parallel run reports). The output is
    opened (created) at its first row, and `lock` then follows its inode; `saved` gets each row's line."""
    ledgers, bad, info = [], 0, {"parallel": 1}
    stream = args.output == "-"
    fd = sys.stdout.fileno() if stream else None
    saved = [] if saved is None else saved
    tokens, t0 = 0, time.perf_counter()
    try:
        with tqdm(total=len(todo), unit="prompt", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            def emit(line: Line, row: dict) -> None:
                nonlocal bad, tokens, fd
                if fd is None:
                    fd = os.open(args.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                    if lock is not None:
                        lock.follow()   # a new file, or a repair's: lock its inode too (hard links)
                append_row(fd, row, sync=not stream)
                saved.append(line)
                if "error" in row:
                    bad += 1
                    tqdm.write(f"infer.py: {input_name(args)}:{line.number}: {row['error']}", file=sys.stderr)
                else:
                    ledgers.append(Ledger.from_dict(row["ledger"]))
                    tokens += len(row["output_ids"])
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s", refresh=False)
                bar.update(1)

            n = parallel_slots(rt, todo, args)
            if n > 1:
                info = run_parallel(rt, [line for line in todo if line.error is None], n, slot_context(
                    [line.need for line in todo if line.error is None], rt), args, policies,
                    partial(safe_row, args=args, run=run), emit, log=lambda m: tqdm.write(m, file=sys.stderr))
                for line in todo:
                    if line.error is not None:
                        emit(line, safe_row(rt, policy, line, args, run))
            else:
                for line in todo:
                    emit(line, safe_row(rt, policy, line, args, run))
    finally:
        if not stream and fd is not None:
            os.close(fd)
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    return ledgers, bad, info


def parallel_slots(rt, todo: list[Line], args) -> int:
    """How many prompts to decode side by side: --parallel, or with 'auto' the measured choice; 1 when fewer
    than two good lines remain or the runtime is not llama.cpp (auto only). Encodes every good line once: a
    line that cannot run becomes its error row here, and the others' lengths size the slots."""
    want = getattr(args, "parallel", 1) or 1
    good = []
    for line in todo:
        if line.error is None and rt is not None:
            try:
                ids = prompt_ids_of(rt, line, args)
                line.need = len(ids) + line.obj.get("max_new_tokens", args.max_new_tokens)
                good.append(line)
            except ProjectError as e:
                line.error = one_line(e)
    on_llama = rt is not None and all(isinstance(b, LlamaCppBackend) for b in (rt.big, *rt.predictors.values()))
    inexact = on_llama and len(good) > 1 and promises_greedy(args) and rt.big.exact_pass is not None
    if inexact:
        why = (f"on {rt.big.name} a pass of more than {rt.big.exact_pass} tokens rounds differently from one-token "
               "steps (llama.cpp's kernels for this file's weight types, e.g. K-quants), so prompts sharing passes "
               "may not give the one-at-a-time output where two tokens nearly tie")
        if want == "auto":
            print(f"infer.py: --parallel auto: one prompt at a time: {why}; --parallel N shares passes anyway",
                  file=sys.stderr)
            return 1
        if int(want) > 1:
            print(f"infer.py: warning: --parallel {want}: {why} (--parallel 1 gives it exactly)", file=sys.stderr)
    if carries_audit(args):   # (an explicit --parallel N > 1 was refused by cli.settle_batch)
        if want == "auto" and len(good) > 1:
            print("infer.py: --parallel auto: one prompt at a time: --audit-scope job carries the audit from one "
                  "prompt to the next, in the file's order", file=sys.stderr)
        return 1
    if want == "auto":
        if len(good) < 2 or not on_llama:
            return 1
        curve, _, _ = batch_curve(rt.big, len(good), log=lambda m: print(m, file=sys.stderr))
        n = choose_parallel(curve, len(good))
        print(f"infer.py: --parallel auto: {n} prompts side by side (the measured gain of a pass over n "
              f"sequences: {', '.join(f'{k}: {k / c:.1f}x' for k, c in sorted(curve.items()))})", file=sys.stderr)
        return n
    return max(1, min(int(want), len(good)))


def carries_audit(args) -> bool:
    """Is the run an audited lossy greedy gate decode whose audit carries from prompt to prompt (--audit-scope
    job)? Then prompts go one at a time, in the file's order."""
    return getattr(args, "audit_scope", "prompt") == "job" and args.policy == "gate" and audits(args, args.verify)


def promises_greedy(args) -> bool:
    """Is each output meant to be the big model's greedy decoding (policy big, or a lossless --verify, at -t 0)?"""
    lossless = args.policy == "big" or getattr(args, "verify", False) and math.isinf(args.verify_below)
    return lossless and args.temperature <= 0


def plan(lines: list[Line], args, policies, run: dict) -> list[Line]:
    """The lines to run: those without a matching result row in --output (repaired first; see repair_output)."""
    out = Path(args.output)
    if args.output == "-" or not out.exists():
        return list(lines)
    tokenizer = []   # read once, and only when some kept row has to be checked against it

    def want(line: Line | None) -> dict:
        if not tokenizer:
            tokenizer.append(big_tokenizer(args, policies))
        return line_identity(run, line, args, tokenizer[0])

    done = repair_output(out, lines, want, getattr(args, "rerun_mismatched", False))
    return [line for line in lines if line.repeated or line.key not in done]


def check_batch_output(args) -> None:
    """Every path a batch run writes, checked before any work (OutputPathError naming it): --output ('-':
    stdout, nothing else), which a resume reads and appends to; its summary OUTPUT.summary.json; under
    `accelerate launch` each process's part file and its summary. The temporary files and lock files derived
    from them get names that fit (common/files.py), in folders the checks found writable."""
    check_output_file(args.output, "--output", parents=False, stdout=True)
    if args.output == "-":
        return
    if os.path.isfile(args.output) and not os.access(args.output, os.R_OK):
        raise OutputPathError(f"--output {args.output}: cannot be read (a re-run reads it to resume); name "
                              "another file")
    _, processes = world()
    outputs = [args.output] + [part_name(args.output, r, processes) for r in range(processes)] * (processes > 1)
    for name in outputs[1:]:
        check_output_file(name, "--output's part file", parents=False)
    for name in outputs:
        check_output_file(summary_name(name), "--output's summary", parents=False)


def check_parallel(args, policies) -> None:
    """An explicit --parallel N > 1 on models that will not open on llama.cpp: refused before loading them."""
    n = getattr(args, "parallel", 1)
    if isinstance(n, int) and n > 1:
        kind, why = backend_of(args, policies)
        if kind != "llama.cpp":
            raise UsageError(f"--parallel {n}: prompts share a pass only on llama.cpp, and this run's models open "
                             f"on {kind} ({why}); use --backend llama.cpp with GGUF models, or --parallel 1")


def run_batch(args, policies) -> int:
    """infer.py --input/--output: see the module docstring. Exit status 2 when some line was bad, 130 when
    interrupted (every finished row kept)."""
    rank, processes = world()
    lines = read_input(args.input)
    check_parallel(args, policies)
    run = run_identity(args, policies)
    if processes > 1:
        return run_sharded(args, policies, lines, run, rank, processes)
    if args.output == "-":
        return run_file(args, policies, lines, run)
    with FileLock(args.output, f"infer.py --output {args.output}") as lock:
        return run_file(args, policies, lines, run, lock)


def run_file(args, policies, lines: list[Line], run: dict, lock: FileLock | None = None) -> int:
    """The lines without a result in args.output (resumed), decoded and appended there; the summary. Ctrl-C:
    says what is saved and how to resume, exit status 130."""
    stream = args.output == "-"
    where = "stdout" if stream else args.output
    todo = plan(lines, args, policies, run)
    print(f"infer.py: {len(lines)} prompts in {input_name(args)}: {len(lines) - len(todo)} already in {where}, "
          f"{len(todo)} to run", file=sys.stderr)
    if not todo:
        if not stream and Path(args.output).exists():
            write_summary(args.output)   # the file's totals (a repair may have changed them), the last run kept
        return 0
    saved: list[Line] = []
    try:
        rt = policy = None
        if any(line.error is None for line in todo):   # only bad lines left: no model needed
            rt = open_runtime(args, policies)
            policy = make_policy(args, rt, policies)
        ledgers, bad, info = run_lines(rt, policy, todo, args, run, policies, lock, saved)
    except KeyboardInterrupt:
        interrupted(args, todo, saved)
        return INTERRUPTED
    print_summary(ledgers, bad, len(todo), args, info)
    return 2 if bad else 0


def interrupted(args, todo: list[Line], saved: list[Line]) -> None:
    """Ctrl-C: what was saved, and how to resume (the summary file then describes the rows saved)."""
    n, left = len(saved), len(todo) - len(saved)
    if args.output == "-":
        print(f"infer.py: interrupted: {n} of {len(todo)} rows were written to stdout; --output - keeps nothing to "
              "resume (name a file to make a batch resumable)", file=sys.stderr)
        return
    if not Path(args.output).exists():
        print(f"infer.py: interrupted before a prompt ended (nothing written to {args.output}); run the same "
              f"command again to run the {left}", file=sys.stderr)
        return
    held = file_summary(Path(args.output))["prompts"]
    write_summary(args.output)
    print(f"infer.py: interrupted: {n} of the {len(todo)} prompts of this run saved in {args.output} ({held} rows "
          f"in it); run the same command again to resume the other {left}", file=sys.stderr)


def world() -> tuple[int, int]:
    """(this process's rank, processes) under `accelerate launch` (or torchrun), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_sharded(args, policies, lines: list[Line], run: dict, rank: int, processes: int) -> int:
    """Several processes over one input: process r decodes lines r, r+P, ... into OUTPUT.part-r-of-P (resumable
    like any output); when all are done, process 0 merges the parts into OUTPUT and removes them. A re-run
    skips what OUTPUT already holds."""
    if args.output == "-":
        raise UsageError("--output -: a run over several processes writes a file (name one)")
    from accelerate import PartialState  # here: importing accelerate takes seconds

    state = PartialState(cpu=True, timeout=timedelta(days=7))   # the others may wait hours at a barrier
    final = Path(args.output)
    part = Path(part_name(args.output, rank, processes))
    with contextlib.ExitStack() as held:
        if rank == 0:
            held.enter_context(FileLock(final, f"infer.py --output {final}"))
            if final.exists():
                plan(lines, args, policies, run)     # repairs OUTPUT: drops error rows and a partial last line
        state.wait_for_everyone()
        done = {id_key(r["id"]) for r in read_rows(final)} if final.exists() else set()
        mine = [line for i, line in enumerate(lines) if i % processes == rank and (line.repeated or line.key not in done)]
        with FileLock(part, f"infer.py --output {part}") as part_lock:
            status = run_file(namespace(args, output=str(part)), policies, mine, run, part_lock)
        state.wait_for_everyone()
        if rank == 0:
            parts = [Path(part_name(args.output, r, processes)) for r in range(processes)]
            merged = [*read_rows(final, raw=True)] if final.exists() else []
            for p in parts:
                merged += read_rows(p, raw=True) if p.exists() else []
            write_text(final, "".join(merged))
            summaries = [json.loads(Path(summary_name(p)).read_text()).get("last_run") for p in parts
                         if Path(summary_name(p)).exists()]
            for p in parts:
                p.unlink(missing_ok=True)
                Path(summary_name(p)).unlink(missing_ok=True)
            write_summary(final, merge_summaries([x for x in summaries if x]) if any(summaries) else None)
            print(f"infer.py: {len(merged)} rows from {processes} processes in {final}", file=sys.stderr)
    return status


def part_name(output: str, rank: int, processes: int) -> str:
    """The part file process `rank` of `processes` writes (accelerate launch)."""
    return f"{output}.part-{rank}-of-{processes}"


def summary_name(output) -> str:
    return f"{output}.summary.json"


def read_rows(path: Path, raw: bool = False) -> list:
    """The whole rows of a results file (a partial last line is left out): dicts, or their lines with raw."""
    *whole, _ = path.read_bytes().split(b"\n")
    rows = [data.decode("utf-8") + "\n" for data in whole if data.strip()]
    return rows if raw else [json.loads(r) for r in rows]


def merge_summaries(parts: list[dict]) -> dict:
    """One run's summary over the processes' (their last_run): counts add up, the wall time is the slowest
    process's."""
    total = {k: sum(p[k] for p in parts) for k in ("prompts", "results", "errors", "tokens")}
    wall = max(p["wall_s"] for p in parts)
    calls = sum(p["big_calls_per_token"] * p["tokens"] for p in parts)
    return dict(total, processes=len(parts), wall_s=wall, tokens_per_s=round(total["tokens"] / wall, 3) if wall else 0.0,
                big_calls_per_token=round(calls / total["tokens"], 4) if total["tokens"] else 0.0,
                parallel=[p.get("parallel") for p in parts])


def file_summary(path: Path) -> dict:
    """What a results file holds: rows (prompts), results, errors, tokens, big calls per token."""
    rows = read_rows(path)
    results = [r for r in rows if "error" not in r]
    tokens = sum(r["ledger"]["new_tokens"] for r in results)
    calls = sum(r["ledger"]["big_calls"] for r in results)
    return dict(prompts=len(rows), results=len(results), errors=len(rows) - len(results), tokens=tokens,
                big_calls_per_token=round(calls / tokens, 4) if tokens else 0.0)


def write_summary(output, last_run: dict | None = None) -> None:
    """OUTPUT.summary.json: the whole file's totals (every run that added to it) and, under "last_run", the
    invocation that last decoded into it (tokens/s, wall time, slots; None: the one already recorded)."""
    path = Path(summary_name(output))
    if last_run is None:
        try:
            last_run = json.loads(path.read_text(encoding="utf-8")).get("last_run")
        except (OSError, ValueError, AttributeError):
            last_run = None
    write_json(path, {**file_summary(Path(output)), "last_run": last_run})


def print_summary(ledgers: list, bad: int, n: int, args, info: dict) -> None:
    """Totals over the prompts of this run (tokens, big calls per token, skipped, wall time, tokens/s) on stderr;
    OUTPUT.summary.json beside the output (not with --output -): the file's totals and this run's."""
    tokens = sum(led.new_tokens for led in ledgers)
    summary = dict(prompts=n, results=len(ledgers), errors=bad, tokens=tokens,
                   tokens_per_s=round(tokens / info["wall_s"], 3) if info["wall_s"] > 0 else 0.0,
                   big_calls_per_token=round(sum(led.big_calls for led in ledgers) / tokens, 4) if tokens else 0.0,
                   **info)
    print(f"infer.py: {tokens} tokens in {info['wall_s']:.1f} s ({summary['tokens_per_s']:.1f} tok/s) over "
          f"{len(ledgers)} prompts, {info['parallel']} side by side", file=sys.stderr)
    if args.output != "-":
        write_summary(args.output, summary)

    if ledgers:
        total = sum_ledgers(ledgers)
        print(format_ledgers({f"{policy_label(total)}, {len(ledgers)} prompts": total}), file=sys.stderr)
    if bad:
        print(f"infer.py: error: {bad} of {n} lines of {input_name(args)} were bad (above, and as error rows in "
              f"{'stdout' if args.output == '-' else args.output}); the other prompts ran", file=sys.stderr)
