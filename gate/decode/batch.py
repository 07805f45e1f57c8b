"""`infer.py --input prompts.jsonl --output results.jsonl`: many prompts, one model load, resumable.

Offline inference means many prompts; one `infer.py` call per prompt loads the model every time. Here the models
and the policy object are built once and the Decoder starts afresh on every prompt (it resets every cache).

Input, one JSON object a line (blank lines are ignored; line numbers count every line):
    {"prompt": "text"}  or  {"prompt_ids": [1, 2, 3]}          exactly one of the two
    optional: "id" (a string or an integer; default: the line number), "max_new_tokens", "temperature",
    "seed" (defaults: -m, -t, --seed)
`prompt` is user text (encoded as literal text, like a prompt argument: --chat and --parse-special apply);
`prompt_ids` are checked against the tokenizer's vocabulary. Unknown keys are refused (a typo such as
"max_tokens" would otherwise be silently ignored), and so are repeated ids (resuming goes by id).

Output, one JSON object a line, in the order prompts finish: id, line, prompt_ids, output_ids, text, sources,
ledger; a bad line (not JSON, neither prompt nor prompt_ids, a bad type, too long for the context, ...) becomes
an error row {id, line, error} and is reported on stderr as PATH:LINE: message, while the rest goes on. The
exit status is 2 when some line was bad, else 0.

Resuming: a re-run skips the ids that have a result row. Error rows are not results: a re-run removes them and
tries those lines again (the input may have been fixed). Each row is appended with one write and fsynced, so a
run killed at any moment leaves whole rows plus at most a partial last line (no newline at its end), which the
re-run drops. Repairs (a partial line, error rows) rewrite the output atomically (corpus_tools.files.write_text).
A complete line that is not a result row means the file is not ours: refused, nothing is touched.

Lock: a lock file beside the output (`.NAME.lock`, corpus_tools.files.FolderLock with its own name), not the
folder's `.lock`: the output is one file, often in a shared folder (the current directory), and two runs writing
different outputs there must not block each other; two runs into the same output are refused at once, naming
the first. The flock dies with its process, so a killed run never blocks the resume.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gate.decode.runtime import UsageError

OPTIONS = ("max_new_tokens", "temperature", "seed")   # per line; defaults: -m, -t, --seed
KEYS = ("id", "prompt", "prompt_ids", *OPTIONS)


@dataclass
class Line:
    """One prompt of the input file: its parsed object, or why it is bad."""
    number: int
    id: object
    obj: dict | None = None
    error: str | None = None
    repeated: bool = False   # its id is an earlier line's: reported on every run, whatever the output holds

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value) -> str:
    return json.dumps(value, ensure_ascii=False)   # "1" and 1 are different ids


# -- input -----------------------------------------------------------------------------------------------------
def read_input(path: str) -> list[Line]:
    """The prompts of --input, each checked as far as that needs no tokenizer (done before loading a model)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"--input {path}: {e.strerror or e}") from None
    lines, seen = [], {}
    for number, data in enumerate(raw.split(b"\n"), 1):
        if data.strip():
            line = parse_line(number, data)
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
    if seed is not None and not (is_int(seed) and 0 <= seed < 2 ** 63):
        return f"'seed' must be an integer in [0, 2**63), got {seed!r}"
    return None


def prompt_ids_of(rt, line: Line, args) -> list[int]:
    """The line's prompt ids (text encoded as user text, ids checked against the vocabulary), checked to fit the
    context with its max_new_tokens; UsageError / ContextLengthError say what is wrong."""
    from gate.decode.cli import encode, user_text

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
def repair_output(path: Path) -> set[str]:
    """The ids (keys) with a result row in the output; a partial last line and error rows are removed."""
    from corpus_tools.files import write_text

    if not path.exists():
        return set()
    raw = path.read_bytes()
    *whole, tail = raw.split(b"\n")
    keep, done, errors = [], set(), 0
    for number, data in enumerate(whole, 1):
        row = result_row(path, number, data)
        if row is not None and "error" in row:
            errors += 1
        elif row is not None:
            done.add(id_key(row["id"]))
            keep.append(data.decode("utf-8") + "\n")
    dropped = ["a partial last line (an interrupted run)"] * bool(tail)
    dropped += [f"{errors} error row{'s' * (errors > 1)} (those lines are tried again)"] * bool(errors)
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


def append_row(fd: int, row: dict) -> None:
    """One row, appended with one write (a kill leaves at most a partial last line) and made durable."""
    data = memoryview((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    while data:
        data = data[os.write(fd, data):]
    os.fsync(fd)


# -- the run ---------------------------------------------------------------------------------------------------
def run_line(rt, policy, line: Line, args) -> dict:
    """The output row of one line: its result, or its error."""
    from corpus_tools.errors import one_line, project_errors
    from gate.decode.cli import run_one
    from gate.decode.registry import namespace

    if line.error is None:
        try:
            ids = prompt_ids_of(rt, line, args)
        except (UsageError, *project_errors()) as e:
            line.error = one_line(e)
    if line.error is not None:
        return dict(id=line.id, line=line.number, error=line.error)
    opts = {k: line.obj[k] for k in OPTIONS if k in line.obj}
    r = run_one(rt, policy, ids, namespace(args, **opts))
    return dict(id=line.id, line=line.number, **{k: r[k] for k in ("prompt_ids", "output_ids", "text", "sources",
                                                                 "ledger")})


def run_lines(rt, policy, todo: list[Line], args) -> tuple[list, int]:
    """Every line in `todo`, each row appended to --output as it finishes; (ledgers, bad lines)."""
    from tqdm import tqdm

    from gate.decode.ledger import Ledger

    ledgers, bad = [], 0
    fd = os.open(args.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        with tqdm(todo, unit="prompt", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            for line in bar:
                row = run_line(rt, policy, line, args)
                append_row(fd, row)
                if "error" in row:
                    bad += 1
                    tqdm.write(f"infer.py: {args.input}:{line.number}: {row['error']}", file=sys.stderr)
                else:
                    ledgers.append(Ledger.from_dict(row["ledger"]))
    finally:
        os.close(fd)
    return ledgers, bad


def run_batch(args, policies) -> int:
    """infer.py --input/--output: see the module docstring. Exit status 2 when some line was bad."""
    from corpus_tools.files import FolderLock
    from gate.decode.cli import make_policy, open_runtime

    lines = read_input(args.input)
    out = Path(args.output)
    with FolderLock(out.parent, f"infer.py --output {out}", name=f".{out.name}.lock"):
        done = repair_output(out)
        todo = [line for line in lines if line.repeated or line.key not in done]
        print(f"infer.py: {len(lines)} prompts in {args.input}: {len(lines) - len(todo)} already in {out}, "
              f"{len(todo)} to run", file=sys.stderr)
        if not todo:
            return 0
        rt = policy = None
        if any(line.error is None for line in todo):   # only bad lines left: no model needed
            rt = open_runtime(args, policies)
            policy = make_policy(args, rt, policies)
        ledgers, bad = run_lines(rt, policy, todo, args)
    print_summary(ledgers, bad, len(todo), args)
    return 2 if bad else 0


def print_summary(ledgers: list, bad: int, n: int, args) -> None:
    """Totals over the prompts of this run (tokens, big calls per token, skipped, wall time, tokens/s)."""
    from gate.decode.ledger import format_ledgers, policy_label, sum_ledgers

    if ledgers:
        total = sum_ledgers(ledgers)
        print(format_ledgers({f"{policy_label(total)}, {len(ledgers)} prompts": total}), file=sys.stderr)
    if bad:
        print(f"infer.py: error: {bad} of {n} lines of {args.input} were bad (above, and as error rows in "
              f"{args.output}); the other prompts ran", file=sys.stderr)
