"""`infer.py --input prompts.jsonl --output results.jsonl`: many prompts, one model load, resumable.

A line is {"prompt": text} or {"prompt_ids": [...]} with optional id, max_new_tokens, temperature, seed; unknown
keys and repeated ids are refused. Each result row (id, line, prompt_ids, output_ids, text, sources, ledger, input
hash, run identity) is appended with one fsynced write as its prompt ends; a bad line or one whose decoding fails
is an error row and the rest goes on (exit status 2). A re-run skips ids with a row of the same line and run,
refuses rows of another (or reruns them: --rerun-mismatched), retries error rows and drops a partial last line.
A lock file beside the output refuses a second writer. --parallel N decodes N prompts side by side on llama.cpp
(gate/decode/parallel.py); under `accelerate launch` each process takes every P-th line into its own part file,
merged into the output at the end. A summary (tokens/s, big calls per token, errors) goes to OUTPUT.summary.json.
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

from common.errors import ProjectError, UsageError, one_line
from common.files import FolderLock, write_json, write_text
from gate.decode.cost import batch_curve
from gate.decode.ledger import Ledger, format_ledgers, policy_label, sum_ledgers
from gate.decode.parallel import choose_parallel, run_parallel, slot_context
from gate.decode.registry import namespace
from gate.decode.session import MIN_TEMPERATURE, audits, encode, make_policy, open_runtime, run_one, user_text
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
                line.repeated = True
                line.error = f"id {line.id!r} repeats line {seen[line.key]}'s (ids must be unique: resuming goes by id)"
            seen.setdefault(line.key, number)
            lines.append(line)
    if not lines:
        raise UsageError(f"--input {path}: no prompts (the file is empty; write one JSON object a line, "
                         'e.g. {"prompt": "Once upon a time"})')
    return lines


def parse_line(number: int, data: bytes) -> Line:
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Line(number, number, error=f"not UTF-8 text ({e.reason} at byte {e.start})")
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
    m, t, seed = (obj.get(k) for k in OPTIONS)
    if m is not None and not (is_int(m) and m >= 1):
        return f"'max_new_tokens' must be an integer >= 1, got {m!r}"
    if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
        return f"'temperature' must be a finite number >= 0, got {t!r}"
    if t is not None and 0 < t < MIN_TEMPERATURE:
        return (f"'temperature' {t!r} is below {MIN_TEMPERATURE:g}: sampling there is greedy in all but name and "
                "overflows float32; write 0 for greedy")
    if seed is not None and not (is_int(seed) and 0 <= seed < 2 ** 63):
        return f"'seed' must be an integer in [0, 2**63), got {seed!r}"
    return None


def prompt_ids_of(rt, line: Line, args) -> list[int]:
    """The line's prompt ids (text encoded as user text, ids checked against the vocabulary), checked to fit the
    context with its max_new_tokens; UsageError / ContextLengthError say what is wrong."""
    obj = line.obj
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
    return json.loads(json.dumps(run, default=str))


def line_identity(run: dict, line: Line, args, tokenizer: str | None) -> dict:
    """The run's identity for one line: its effective options and the tokenizer."""
    opts = {k: line.obj.get(k, getattr(args, k)) for k in OPTIONS} if line.obj else {}
    return json.loads(json.dumps({**run, **opts, "tokenizer": tokenizer}))


def big_tokenizer(args, policies) -> str:
    """The fingerprint of the run's big model's tokenizer, read without its weights."""
    try:
        big, _ = policies[args.policy].model_names(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return tokenizer_fingerprint(load_tokenizer(big))


def mismatch(row: dict, line: Line | None, want: dict | None) -> str | None:
    """Why a kept row was not made from `line` by this run (None: it was, or its id is no line of the input)."""
    if line is None:
        return None
    if "input" not in row or "run" not in row:
        return "made by an older infer.py (no input hash)"
    if row["input"] != line.digest:
        return f"input line {line.number} is not the line it was made from"
    got = row["run"] if isinstance(row["run"], dict) else {}
    diff = [k for k in want if got.get(k) != want[k]]
    return ", ".join(f"{k} {got.get(k)!r} (this run: {want[k]!r})" for k in diff[:3]) or None


def repair_output(path: Path, lines: list[Line], want, rerun: bool) -> set[str]:
    """The ids (keys) with a result row of their own line and this run (want(line): its identity) in the output.
    A partial last line and error rows are removed; a row of another line or run is refused (UsageError naming
    what differs) or, with `rerun`, removed."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    *whole, tail = raw.split(b"\n")
    by_key = {line.key: line for line in lines if not line.repeated}
    keep, done, errors, wrong = [], set(), 0, []
    for number, data in enumerate(whole, 1):
        row = result_row(path, number, data)
        if row is None:
            continue
        if "error" in row:
            errors += 1
            continue
        line = by_key.get(id_key(row["id"]))
        why = mismatch(row, line, want(line) if line else None)
        if why:
            wrong.append(f"row {number} (id {row['id']!r}): {why}")
            if rerun:
                continue
        done.add(id_key(row["id"]))
        keep.append(data.decode("utf-8") + "\n")
    if wrong and not rerun:
        raise UsageError(f"--output {path}: {len(wrong)} row{'s' * (len(wrong) > 1)} do not match this run's input "
                         f"and settings, first {wrong[0]}; name a new --output, or add --rerun-mismatched to run "
                         "those lines again")
    dropped = ["a partial last line (an interrupted run)"] * bool(tail)
    dropped += [f"{errors} error row{'s' * (errors > 1)} (those lines are tried again)"] * bool(errors)
    dropped += [f"{len(wrong)} row{'s' * (len(wrong) > 1)} of another line or run (--rerun-mismatched)"] * bool(wrong)
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


def run_lines(rt, policy, todo: list[Line], args, run: dict, policies) -> tuple[list, int, dict]:
    """Every line in `todo`, each row appended to --output (or streamed to stdout: '-') as it finishes, one prompt
    at a time or --parallel N side by side; (ledgers, bad lines, what the parallel run reports)."""
    ledgers, bad, info = [], 0, {"parallel": 1}
    stream = args.output == "-"
    fd = sys.stdout.fileno() if stream else os.open(args.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    tokens, t0 = 0, time.perf_counter()
    try:
        with tqdm(total=len(todo), unit="prompt", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            def emit(line: Line, row: dict) -> None:
                nonlocal bad, tokens
                append_row(fd, row, sync=not stream)
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
                    partial(safe_row, args=args, run=run), emit, log=tqdm.write)
                for line in todo:
                    if line.error is not None:
                        emit(line, safe_row(rt, policy, line, args, run))
            else:
                for line in todo:
                    emit(line, safe_row(rt, policy, line, args, run))
    finally:
        if not stream:
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
        curve, _, _ = batch_curve(rt.big, log=lambda m: print(m, file=sys.stderr))
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

    def want(line: Line) -> dict:
        if not tokenizer:
            tokenizer.append(big_tokenizer(args, policies))
        return line_identity(run, line, args, tokenizer[0])

    done = repair_output(out, lines, want, getattr(args, "rerun_mismatched", False))
    return [line for line in lines if line.repeated or line.key not in done]


def run_batch(args, policies) -> int:
    """infer.py --input/--output: see the module docstring. Exit status 2 when some line was bad."""
    rank, processes = world()
    lines = read_input(args.input)
    run = run_identity(args, policies)
    if processes > 1:
        return run_sharded(args, policies, lines, run, rank, processes)
    stream = args.output == "-"
    where = "stdout" if stream else args.output
    lock = contextlib.nullcontext() if stream else FolderLock.of_file(args.output, f"infer.py --output {where}")
    with lock:
        return run_file(args, policies, lines, run)


def run_file(args, policies, lines: list[Line], run: dict) -> int:
    """The lines without a result in args.output (resumed), decoded and appended there; the summary."""
    where = "stdout" if args.output == "-" else args.output
    todo = plan(lines, args, policies, run)
    print(f"infer.py: {len(lines)} prompts in {input_name(args)}: {len(lines) - len(todo)} already in {where}, "
          f"{len(todo)} to run", file=sys.stderr)
    if not todo:
        return 0
    rt = policy = None
    if any(line.error is None for line in todo):   # only bad lines left: no model needed
        rt = open_runtime(args, policies)
        policy = make_policy(args, rt, policies)
    ledgers, bad, info = run_lines(rt, policy, todo, args, run, policies)
    print_summary(ledgers, bad, len(todo), args, info)
    return 2 if bad else 0


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
    part = Path(f"{args.output}.part-{rank}-of-{processes}")
    with contextlib.ExitStack() as held:
        if rank == 0:
            held.enter_context(FolderLock.of_file(final, f"infer.py --output {final}"))
            if final.exists():
                plan(lines, args, policies, run)     # repairs OUTPUT: drops error rows and a partial last line
        state.wait_for_everyone()
        done = {id_key(r["id"]) for r in read_rows(final)} if final.exists() else set()
        mine = [line for i, line in enumerate(lines) if i % processes == rank and (line.repeated or line.key not in done)]
        with FolderLock.of_file(part, f"infer.py --output {part}"):
            status = run_file(namespace(args, output=str(part)), policies, mine, run)
        state.wait_for_everyone()
        if rank == 0:
            parts = [Path(f"{args.output}.part-{r}-of-{processes}") for r in range(processes)]
            merged = [*read_rows(final, raw=True)] if final.exists() else []
            for p in parts:
                merged += read_rows(p, raw=True) if p.exists() else []
            write_text(final, "".join(merged))
            summaries = [json.loads(Path(f"{p}.summary.json").read_text()) for p in parts
                         if Path(f"{p}.summary.json").exists()]
            for p in parts:
                p.unlink(missing_ok=True)
                Path(f"{p}.summary.json").unlink(missing_ok=True)
            if summaries:
                write_json(f"{final}.summary.json", merge_summaries(summaries))
            print(f"infer.py: {len(merged)} rows from {processes} processes in {final}", file=sys.stderr)
    return status


def read_rows(path: Path, raw: bool = False) -> list:
    """The whole rows of a results file (a partial last line is left out): dicts, or their lines with raw."""
    *whole, _ = path.read_bytes().split(b"\n")
    rows = [data.decode("utf-8") + "\n" for data in whole if data.strip()]
    return rows if raw else [json.loads(r) for r in rows]


def merge_summaries(parts: list[dict]) -> dict:
    """One summary over the processes' summaries: counts add up, the wall time is the slowest process's."""
    total = {k: sum(p[k] for p in parts) for k in ("prompts", "results", "errors", "tokens")}
    wall = max(p["wall_s"] for p in parts)
    calls = sum(p["big_calls_per_token"] * p["tokens"] for p in parts)
    return dict(total, processes=len(parts), wall_s=wall, tokens_per_s=round(total["tokens"] / wall, 3) if wall else 0.0,
                big_calls_per_token=round(calls / total["tokens"], 4) if total["tokens"] else 0.0,
                parallel=[p.get("parallel") for p in parts])


def print_summary(ledgers: list, bad: int, n: int, args, info: dict) -> None:
    """Totals over the prompts of this run (tokens, big calls per token, skipped, wall time, tokens/s) on stderr,
    and the same in OUTPUT.summary.json beside the output (not with --output -)."""
    tokens = sum(led.new_tokens for led in ledgers)
    summary = dict(prompts=n, results=len(ledgers), errors=bad, tokens=tokens,
                   tokens_per_s=round(tokens / info["wall_s"], 3) if info["wall_s"] > 0 else 0.0,
                   big_calls_per_token=round(sum(led.big_calls for led in ledgers) / tokens, 4) if tokens else 0.0,
                   **info)
    print(f"infer.py: {tokens} tokens in {info['wall_s']:.1f} s ({summary['tokens_per_s']:.1f} tok/s) over "
          f"{len(ledgers)} prompts, {info['parallel']} side by side", file=sys.stderr)
    if args.output != "-":
        write_json(f"{args.output}.summary.json", summary)

    if ledgers:
        total = sum_ledgers(ledgers)
        print(format_ledgers({f"{policy_label(total)}, {len(ledgers)} prompts": total}), file=sys.stderr)
    if bad:
        print(f"infer.py: error: {bad} of {n} lines of {input_name(args)} were bad (above, and as error rows in "
              f"{'stdout' if args.output == '-' else args.output}); the other prompts ran", file=sys.stderr)
