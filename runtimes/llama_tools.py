"""llama.cpp's own programs and converter, from the llama-cpp-python source distribution the project pins.

    src = llama_cpp_source()                      # vendor/llama.cpp of the pinned sdist, unpacked once into the cache
    convert_hf_to_gguf(hf_dir, out, "f32", target_dir=None)   # llama.cpp's convert_hf_to_gguf.py, its own gguf-py
    path = find_tool("llama-speculative-simple")  # $SKIPGATE_LLAMA_BIN, else the venv's bin/, else PATH
    build_tools(bin_dir)                          # `make llama-tools`: cmake + ninja, CPU only, into .venv/bin

Why the sdist and not a git checkout: llama-cpp-python==LLAMA_CPP_PYTHON (requirements.txt) vendors one llama.cpp
commit; the binding the project decodes with, the converter and the programs then come from the same source. The
sdist is fetched with pip (`pip download --no-binary :all: --no-deps`) into $SKIPGATE_CACHE/llama.cpp-src/ once
and unpacked beside it (written under a temporary name and renamed, so a killed unpack is never taken for a
finished one). A llama.cpp of your own: SKIPGATE_LLAMA_SRC=DIR (a checkout with convert_hf_to_gguf.py and
gguf-py/) and SKIPGATE_LLAMA_BIN=DIR (its build's bin/, holding llama-speculative-simple and llama-simple).
The converter runs in this interpreter with llama.cpp's gguf-py first on sys.path (the venv's PyPI gguf is older).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common.errors import ProjectError, fail
from common.files import atomic_path, write_json
from runtimes.sources import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"         # the pin of requirements.txt: the binding, the converter and the tools agree
SRC_ENV = "SKIPGATE_LLAMA_SRC"      # a llama.cpp source folder to use instead of the sdist's
BIN_ENV = "SKIPGATE_LLAMA_BIN"      # a folder of llama.cpp programs to use instead of the venv's
REQUIRED_TOOLS = ("llama-speculative-simple", "llama-simple")   # speculative decoding and its plain greedy reference
OPTIONAL_TOOLS = ("llama-completion", "llama-server")            # built when they build here
STAMP = ".llama-tools.json"         # in the bin folder: what was built, from which source, how long it took
# CPU only, this machine's instruction set, static (the programs copied into the venv need no libllama.so), no
# network at build time (the server's web UI would be fetched from a hub otherwise; HTTPS support off).
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA=OFF",
               "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF")


class LlamaToolsError(RuntimeError, ProjectError):
    """llama.cpp's source, converter or programs are missing or failed; the message says what to run."""


def _tail(text: str, n: int = 1) -> str:
    """The last n lines of a program's output that say something (for a one-line error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("^", "~"))]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def source_root() -> Path:
    """Where the sdist and its unpacked copy live: $SKIPGATE_CACHE/llama.cpp-src/."""
    return cache_dir() / "llama.cpp-src"


def sdist_path() -> Path:
    """The pinned llama-cpp-python source distribution, downloaded with pip into the cache once."""
    root = source_root()
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if (root / name).is_file():
        return root / name
    cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-binary", ":all:",
           "--no-deps", "-d"]
    if os.environ.get("SKIPGATE_NO_INSTALL") == "1":
        raise LlamaToolsError(f"llama.cpp's source is not in {root} and SKIPGATE_NO_INSTALL=1; fetch it with: "
                              f"{' '.join(cmd[2:])} {root}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        print(f"[llama.cpp] fetching the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution once "
              f"(into {root})", file=sys.stderr)
        r = subprocess.run(cmd + [tmp], capture_output=True, text=True)
        got = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not got:
            raise LlamaToolsError(f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} failed: {_tail(r.stderr)}")
        os.replace(got[0], root / name)
    return root / name


def llama_cpp_source() -> Path:
    """The llama.cpp source folder (convert_hf_to_gguf.py, gguf-py/, CMakeLists.txt): $SKIPGATE_LLAMA_SRC, else the
    pinned sdist's vendor/llama.cpp, unpacked into the cache once."""
    own = os.environ.get(SRC_ENV)
    if own:
        src = Path(own).expanduser()
        if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "gguf-py").is_dir():
            raise LlamaToolsError(f"{SRC_ENV}={own}: not a llama.cpp source folder (no convert_hf_to_gguf.py "
                                  "and gguf-py/ in it)")
        return src
    unpacked = source_root() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    src = unpacked / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    sdist = sdist_path()
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=source_root()))
    try:
        try:
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise LlamaToolsError(f"{sdist}: cannot unpack it ({e}); remove it and run again to fetch it anew") \
                from None
        top = tmp / unpacked.name
        if not (top / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
            raise LlamaToolsError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py in it")
        try:
            os.rename(top, unpacked)
        except OSError:
            if not (src / "convert_hf_to_gguf.py").is_file():   # lost a race only if the other copy is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def converter_env(src: Path) -> dict:
    """The environment the converter runs in: llama.cpp's own gguf-py before the venv's older PyPI gguf."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), str(src)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def convert_hf_to_gguf(hf_dir: str | Path, outfile: str | Path, outtype: str = "f32",
                       target_dir: str | Path | None = None, what: str | None = None) -> Path:
    """Convert a Hugging Face folder to one GGUF file with llama.cpp's own convert_hf_to_gguf.py (an EAGLE-3 draft
    needs `target_dir`, its target's HF folder: tokenizer, layer count, hidden size). Written atomically; the
    converter's last words become a LlamaToolsError (naming `what`, default hf_dir) when it fails."""
    src = llama_cpp_source()
    outfile = Path(outfile)
    with atomic_path(outfile) as tmp:
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(tmp),
               "--outtype", outtype]
        if target_dir is not None:
            cmd += ["--target-model-dir", str(target_dir)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=converter_env(src), cwd=src)
        if r.returncode != 0 or not Path(tmp).is_file():
            raise LlamaToolsError(f"llama.cpp's convert_hf_to_gguf.py could not convert {what or hf_dir}: "
                                  f"{_tail(r.stderr + r.stdout)}")
    return outfile


# ------------------------------------------------------------------------------------------------ the programs
def venv_bin() -> Path:
    """The bin/ folder of the running interpreter's environment (the project's .venv/bin)."""
    return Path(sys.prefix) / "bin"


def find_tool(name: str) -> Path | None:
    """A llama.cpp program by name: in $SKIPGATE_LLAMA_BIN when set (a system-wide llama.cpp), else in the venv's
    bin/ (`make llama-tools`), else on PATH; None when none has it."""
    own = os.environ.get(BIN_ENV)
    if own:
        p = Path(own).expanduser() / name
        return p if p.is_file() and os.access(p, os.X_OK) else None
    p = venv_bin() / name
    if p.is_file() and os.access(p, os.X_OK):
        return p
    found = shutil.which(name)
    return Path(found) if found else None


def require_tool(name: str) -> Path:
    """find_tool, or LlamaToolsError saying how to get the program."""
    p = find_tool(name)
    if p is None:
        where = f"{BIN_ENV}={os.environ[BIN_ENV]}" if os.environ.get(BIN_ENV) else f"{venv_bin()} or PATH"
        raise LlamaToolsError(f"llama.cpp's {name} is not in {where}; `make llama-tools` builds it from the pinned "
                              f"source (or set {BIN_ENV} to the bin/ folder of a llama.cpp build)")
    return p


def build_tools(bin_dir: str | Path | None = None, jobs: int | None = None, log=print,
                optional: tuple = OPTIONAL_TOOLS) -> dict:
    """Build REQUIRED_TOOLS (and those of `optional` that build here) from llama_cpp_source() with cmake and ninja,
    CPU only, and copy them into bin_dir (default: the venv's bin/); writes bin_dir/STAMP last. Returns the stamp."""
    bin_dir = Path(bin_dir) if bin_dir else venv_bin()
    for prog in ("cmake", "ninja", "c++"):
        if shutil.which(prog) is None:
            raise LlamaToolsError(f"building llama.cpp's programs needs {prog} on PATH (apt-get install cmake "
                                  "ninja-build g++)")
    t0 = time.time()
    src = llama_cpp_source()
    build = cache_dir() / "llama.cpp-build" / f"{LLAMA_CPP_PYTHON}-{'own' if os.environ.get(SRC_ENV) else 'sdist'}"
    jobs = jobs or os.cpu_count() or 1
    log(f"[llama-tools] configuring {src} in {build}")
    r = subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LlamaToolsError(f"cmake could not configure llama.cpp: {_tail(r.stderr + r.stdout, 3)}")
    built, failed, seconds = [], {}, {"fetch_configure": round(time.time() - t0, 1)}
    for group in (REQUIRED_TOOLS, *((t,) for t in OPTIONAL_TOOLS if t in optional)):
        log(f"[llama-tools] building {', '.join(group)} ({jobs} jobs)")
        t1 = time.time()
        r = subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *group],
                           capture_output=True, text=True)
        seconds[group[0]] = round(time.time() - t1, 1)
        if r.returncode != 0:
            if group is REQUIRED_TOOLS:
                raise LlamaToolsError(f"building {', '.join(group)} failed: {_tail(r.stdout + r.stderr, 3)}")
            failed[group[0]] = f"exit {r.returncode}: {_tail(r.stdout + r.stderr, 2)}"
            log(f"[llama-tools] {group[0]} did not build here (left out; run again to retry): {failed[group[0]]}")
            continue
        built += list(group)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in built:
        exe = build / "bin" / name
        if not exe.is_file():
            raise LlamaToolsError(f"the build reported {name} but {exe} is missing")
        with atomic_path(bin_dir / name) as tmp:
            shutil.copyfile(exe, tmp)
        os.chmod(bin_dir / name, 0o755)
    stamp = {"llama_cpp_python": LLAMA_CPP_PYTHON, "source": str(src), "tools": built, "left_out": failed,
             "cmake_flags": list(CMAKE_FLAGS), "jobs": jobs, "seconds": round(time.time() - t0, 1),
             "seconds_per_step": seconds}
    write_json(bin_dir / STAMP, stamp)
    log(f"[llama-tools] {', '.join(built)} in {bin_dir} ({stamp['seconds']:.0f} s)")
    return stamp


# ------------------------------------------------------------------------------------- running them, parsed
def _num(pattern: str, text: str, cast=int):
    m = re.search(pattern, text)
    return cast(m.group(1)) if m else None


def _program_text(stdout: str) -> str:
    """The prompt and the generated text as a program printed them (its blank lines around them dropped)."""
    return stdout.strip("\n")


def draft_rounds(log: str) -> list[dict]:
    """llama-speculative-simple's draft rounds from its debug log (-v): per round the drafted tokens (the top
    candidate at each draft position), how many the target accepted, and the target's own token after them."""
    rounds, cands = [], {}
    for line in log.splitlines():
        m = re.search(r"draft candidate\s+0, pos\s+(\d+):\s+(-?\d+)", line)
        if m:
            cands[int(m.group(1))] = int(m.group(2))
            continue
        m = re.search(r"accepted (\d+)/(\d+) draft tokens, the last target token is: \((-?\d+)\)", line)
        if m:
            a, n = int(m.group(1)), int(m.group(2))
            rounds.append({"drafts": [cands[i] for i in range(n) if i in cands], "accepted": a,
                           "target": int(m.group(3))})
            cands = {}
    return rounds


def speculative_simple(model: str | Path, prompt: str, n_predict: int, spec_type: str = "draft-eagle3",
                       draft: str | Path | None = None, draft_max: int | None = 3, threads: int | None = None,
                       ctx: int = 2048, verbose: bool = False, extra: tuple = (), timeout: float = 600) -> dict:
    """Run llama.cpp's llama-speculative-simple greedily (--temp 0) and parse what it printed: text (prompt +
    generation), n_prompt, n_predict (it may run a draft past the -n it was given), n_drafted, n_accept, decode
    tokens/s, the draft statistics line and, with verbose, every draft round (draft_rounds). draft_max: the most
    tokens a draft round proposes (--spec-draft-n-max; None: llama.cpp's default for the type)."""
    exe = require_tool("llama-speculative-simple")
    cmd = [str(exe), "-m", str(model), "--spec-type", spec_type, "--temp", "0", "-n", str(n_predict), "-c", str(ctx),
           "-p", prompt, *extra]
    if draft_max is not None:                       # None: the type's own default (the n-gram drafters have theirs)
        cmd += ["--spec-draft-n-max", str(draft_max)]
    if draft is not None:
        cmd += ["-md", str(draft)]
    if threads:
        cmd += ["-t", str(threads)]
    cmd += ["-v"] if verbose else ["-lv", "4"]       # -lv 4: the draft statistics line, not the per-token debug lines
    r = subprocess.run(cmd, capture_output=True, text=True, errors="backslashreplace", timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise LlamaToolsError(f"llama-speculative-simple failed (exit {r.returncode}): {_tail(r.stderr, 2)}")
    log = r.stderr
    out = {"command": cmd, "text": _program_text(r.stdout), "n_prompt": _num(r"encoded\s+(\d+) tokens", log),
           "n_predict": _num(r"n_predict = (\d+)", log), "n_drafted": _num(r"n_drafted = (\d+)", log),
           "n_accept": _num(r"n_accept\s+= (\d+)", log),
           "decode_tokens": _num(r"decoded\s+(\d+) tokens in", log),
           "decode_s": _num(r"decoded\s+\d+ tokens in\s+([\d.]+) seconds", log, float),
           "decode_tokens_per_s": _num(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+)", log, float),
           "stats": next((ln.split("statistics", 1)[1].strip() for ln in log.splitlines() if "statistics" in ln),
                         None)}
    if out["n_predict"] is not None and out["n_accept"] is not None:
        passes = out["n_predict"] - out["n_accept"]       # each target pass gives its accepted drafts + one token
        out["target_passes"] = passes
        out["tokens_per_pass"] = round(out["n_predict"] / passes, 4) if passes else None
        out["accept_rate"] = round(out["n_accept"] / out["n_drafted"], 4) if out["n_drafted"] else None
    if verbose:
        out["rounds"] = draft_rounds(log)
    return out


def plain_greedy(model: str | Path, prompt: str, n_predict: int, threads: int | None = None, ctx: int = 2048,
                 timeout: float = 600) -> dict:
    """llama.cpp's plain greedy decode of the same GGUF: llama-completion (the same common options as
    llama-speculative-simple) where built, else llama-simple (its own defaults). text, n_predict, decode tokens/s."""
    exe = find_tool("llama-completion")
    if exe is not None:
        cmd = [str(exe), "-m", str(model), "-p", prompt, "-n", str(n_predict), "--temp", "0", "-c", str(ctx),
               "-no-cnv", *(["-t", str(threads)] if threads else [])]
    else:
        cmd = [str(require_tool("llama-simple")), "-m", str(model), "-n", str(n_predict), prompt]
    r = subprocess.run(cmd, capture_output=True, text=True, errors="backslashreplace", timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise LlamaToolsError(f"{Path(cmd[0]).name} failed (exit {r.returncode}): {_tail(r.stderr, 2)}")
    log = r.stderr
    if exe is not None:
        ms, timed = _num(r"common_perf_print:\s+eval time =\s+([\d.]+) ms", log, float), \
            _num(r"common_perf_print:\s+eval time =\s+[\d.]+ ms /\s+(\d+) runs", log)
        secs = ms / 1000 if ms is not None else None
        n = timed + 1 if timed is not None else None       # the first token comes from the prompt pass
    else:
        n = timed = _num(r"decoded (\d+) tokens", log)
        secs = _num(r"decoded \d+ tokens in\s+([\d.]+) s", log, float)
    tps = timed / secs if timed and secs else None
    text = _program_text(r.stdout)
    eos = text.endswith(" [end of text]")           # llama-completion's mark of an end-of-generation token
    return {"command": cmd, "program": Path(cmd[0]).name, "text": text[:-len(" [end of text]")] if eos else text,
            "eos": eos, "n_predict": n,
            "decode_tokens": timed, "decode_s": secs, "decode_tokens_per_s": round(tps, 3) if tps else None}


def main(argv=None) -> int:
    """`python -m runtimes.llama_tools build [--bin DIR] [--jobs N]` (what `make llama-tools` runs), or `where`:
    the programs and source this environment would use."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m runtimes.llama_tools", description=main.__doc__)
    ap.add_argument("what", choices=("build", "where"))
    ap.add_argument("--bin", help="folder to put the programs in (default: this environment's bin/)")
    ap.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    ap.add_argument("--without", nargs="*", default=[], choices=OPTIONAL_TOOLS, metavar="TOOL",
                    help=f"optional programs to leave out ({', '.join(OPTIONAL_TOOLS)})")
    args = ap.parse_args(argv)
    try:
        if args.what == "build":
            build_tools(args.bin, args.jobs, optional=tuple(t for t in OPTIONAL_TOOLS if t not in args.without))
        else:
            print(json.dumps({t: str(find_tool(t)) if find_tool(t) else None
                              for t in REQUIRED_TOOLS + OPTIONAL_TOOLS}, indent=1))
    except ProjectError as e:
        return fail("llama-tools", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
