"""What a verify pass costs and what a draft is worth: the measured cost curve, the acceptance model, the planner.

    prof = load_or_measure(backend)          # cost[n] of one pass feeding n tokens, in one-token steps (cached)
    acc = Acceptance()                       # P(draft accepted | the drafts before it were), learned while decoding
    plan = Planner(prof, acc)                # the decode loop asks it how long each draft chain should be

The planner cuts each draft chain to the length that pays best, down to no draft at all when none pays, so
decoding with drafts is never meaningfully slower than the big model alone; a drafter that never pays is asked
only at rare probes. The rate it maximises, the acceptance model and the measurements: docs/speed.md.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from common.cpu import OtherCPU
from common.errors import UsageError
from common.files import check_output_file, json_text, write_json
from runtimes.batched import LlamaCppSlots
from runtimes.llamacpp import LlamaCppBackend, import_binding
from runtimes.open import BACKENDS, open_models
from runtimes.sources import cache_dir, gguf_path

PROFILE_KS = tuple(range(1, 33))      # pass lengths `train.py models --profile` measures
QUICK_KS = tuple(range(1, 17)) + (20, 24, 32)   # what decoding measures on first use (a few seconds)
CONTEXT = 256                          # tokens in the cache while a pass is timed
MAX_CHAIN = 32                         # longest draft chain the planner considers
CEILING_SHARE = 0.97                   # chains stop where a longer pass raises the ceiling by less than 3%
NOISY = 0.10                           # repeated passes differing more than this (median relative deviation): not cached
PROBE = 8                              # a drafter that does not pay is still asked at every PROBE-th chain start, or rarer
MAX_PROBE_GAP = 64 * PROBE             # ... down to every 512th while its probes keep failing (a probe of a held-back
#                                        feature head pays for the rows it missed: a few steps)


# -- the cost curve ----------------------------------------------------------------------------------------
@dataclass
class CostProfile:
    """cost[n] = time of one pass feeding n tokens (n logits rows) / time of a one-token pass, for n in `ks`."""
    key: dict
    step_ms: float
    ks: list[int]
    cost: list[float]
    measured: str = ""                 # when, and the load average then

    def __post_init__(self):
        self._table = dict(zip(self.ks, self.cost))

    def of(self, n: int) -> float:
        """Cost of a pass feeding n >= 1 tokens, in steps: measured, interpolated, or extrapolated linearly."""
        if n in self._table:
            return self._table[n]
        ks = self.ks
        if n > ks[-1]:
            per = (self.cost[-1] - self.cost[-2]) / (ks[-1] - ks[-2]) if len(ks) > 1 else 1.0
            return self.cost[-1] + per * (n - ks[-1])
        lo = max(k for k in ks if k < n)
        hi = min(k for k in ks if k > n)
        t = (n - lo) / (hi - lo)
        return self._table[lo] * (1 - t) + self._table[hi] * t

    def ceiling(self, n: int) -> float:
        """Speed-up of a drafter that is always right with passes of n tokens: n tokens for cost[n] steps."""
        return n / self.of(n)

    def to_dict(self) -> dict:
        return dict(key=self.key, step_ms=self.step_ms, ks=self.ks, cost=self.cost, measured=self.measured)

    @classmethod
    def from_dict(cls, d: dict) -> "CostProfile":
        return cls(d["key"], d["step_ms"], list(d["ks"]), list(d["cost"]), d.get("measured", ""))

    def table(self) -> str:
        lines = [f"one-token step {self.step_ms:.2f} ms; n = tokens in one pass (the last token + n-1 drafts)",
                 "   n   cost(n) in steps   ceiling n/cost(n)"]
        lines += [f"{k:4d}   {c:16.2f}   {k / c:17.2f}" for k, c in zip(self.ks, self.cost)]
        best = max(self.ks, key=self.ceiling)
        lines.append(f"best ceiling {self.ceiling(best):.2f}x at n = {best} (a drafter that is always right)")
        return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_key(backend, hidden: bool = False) -> dict:
    """What the cost curve depends on: the model file, the runtime and its settings, the threads, the CPU."""
    path = getattr(backend, "path", None)
    file = {}
    if path is not None and Path(path).is_file():
        st = Path(path).stat()
        file = dict(file=str(Path(path).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
    else:
        file = dict(file=backend.name)
    return dict(**file, backend=type(backend).__name__, threads=backend_threads(backend),
                dtype=str(getattr(backend, "dtype", "")), hidden=hidden, cpu=cpu_name(), cores=os.cpu_count(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""))


def backend_threads(backend) -> int:
    n = getattr(backend, "n_threads", None)
    if n:
        return int(n)
    return torch.get_num_threads()


def cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "profiles" / f"{digest}.json"


def measure(backend, ks: Sequence[int] = PROFILE_KS, reps: int = 7, context: int = CONTEXT,
            progress: Callable[[int], None] | None = None) -> tuple[float, list[float], float]:
    """(step ms, cost[k] for k in ks, spread): the median time of a pass feeding k tokens after `context` cached
    ones, over `reps` passes, relative to a one-token pass; spread is the median over k of the passes' relative
    deviation from their median (a quiet machine: a few percent). The backend's cache is reset afterwards."""
    vocab = backend.vocab_size
    gen = torch.Generator().manual_seed(0)
    room = getattr(backend, "n_ctx", None)
    context = min(context, room - max(ks) - 1) if room else context
    prefix = torch.randint(0, vocab, (context,), generator=gen).tolist()
    backend.reset()
    backend.forward(prefix, keep=1)
    times = {}
    for k in [1, *ks]:                          # the first k = 1 round warms up
        toks = torch.randint(0, vocab, (k,), generator=gen).tolist()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            backend.forward(toks, keep=k)
            t.append(time.perf_counter() - t0)
            backend.crop(context)
        times[k] = t
        if progress:
            progress(k)
    backend.reset()
    return summarise_times(times, ks)


def summarise_times(times: dict[int, list[float]], ks: Sequence[int]) -> tuple[float, list[float], float]:
    """(step ms, [median time of k / median time of 1 for k in ks], spread) of repeated timings per size k."""
    med = {k: statistics.median(t) for k, t in times.items()}
    spread = statistics.median(statistics.median(abs(x - med[k]) for x in t) / med[k] for k, t in times.items())
    return med[1] * 1000, [round(med[k] / med[1], 3) for k in ks], round(spread, 4)


def measured_profile(key: dict, ks: Sequence[int], what: str, run: Callable[[], tuple[float, list[float], float]],
                     refresh: bool = False, log: Callable[[str], None] | None = None) -> CostProfile:
    """The cached curve of `key` covering ks, or one measured now by `run()`. A measurement is cached only when
    the timings themselves say it was clean: no other process took more than QUIET_CORES cores meanwhile
    (common/cpu.py: the load average would count this process's own recent work) and repeated passes agreed
    within NOISY. One line on stderr (`log`) says what was measured and whether it was cached."""
    prof = None if refresh else cached(key, ks)
    if prof is not None:
        return prof
    with OtherCPU() as other:
        step, cost, spread = run()
    clean = other.quiet and spread <= NOISY
    prof = CostProfile(key, round(step, 3), list(ks), cost,
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {other.describe()}, spread {spread:.1%}")
    if clean:
        write_json(cache_file(key), prof.to_dict())
    if log:
        why = ([f"{other.describe()} meanwhile"] if not other.quiet else []) + (
            [f"repeated passes differed by {spread:.0%}"] if spread > NOISY else [])
        where = (f"cached in {cache_file(key).parent}" if clean else
                 f"not cached ({' and '.join(why)}), so it is measured again next run")
        log(f"measured {what} in {other.wall_s:.1f} s ({prof.step_ms:.1f} ms a step); {where}")
    return prof


def load_or_measure(backend, hidden: bool = False, ks: Sequence[int] = QUICK_KS, reps: int = 5,
                    refresh: bool = False, log: Callable[[str], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> CostProfile:
    """The cached cost curve of this backend's model file, runtime, threads and CPU, measured now if there is
    none (or `refresh`). The backend's hidden-state setting is set to `hidden` while measuring."""
    key = profile_key(backend, hidden)

    def run():
        saved = backend.hidden_layer
        backend.hidden_layer = getattr(backend, "n_layers", None) if hidden else None
        try:
            return measure(backend, ks, reps, progress=progress)
        finally:
            backend.hidden_layer = saved
    return measured_profile(key, ks, f"the cost of a verify pass of 1..{max(ks)} tokens for {backend.name} "
                            f"({key['threads']} threads)", run, refresh, log)


SLOT_NS = (1, 2, 4, 8, 16, 24, 32, 48, 64)   # sequences per pass the batch curve measures
SLOT_CONTEXT = 96                           # tokens cached per sequence while a batched pass is timed


def batch_curve(backend, up_to: int = SLOT_NS[-1], reps: int = 3, refresh: bool = False,
                log: Callable[[str], None] | None = None) -> tuple[dict[int, float], float, dict]:
    """({n: cost of one pass feeding one token to each of n sequences, in one-token steps}, step ms, key) for
    the llama.cpp model under `backend`, for the sizes in SLOT_NS up to the first >= up_to (a run of up_to
    prompts uses no more slots): measured in a LlamaCppSlots context and cached like a profile. A cached curve
    that reaches far enough is used as it is; a larger run measures once more, up to its own size."""
    ns = [n for n in SLOT_NS if n < up_to] + [next((n for n in SLOT_NS if n >= up_to), SLOT_NS[-1])]
    key = dict(profile_key(backend), curve="slots")
    prof = measured_profile(key, ns, f"the cost of a pass over 1..{ns[-1]} sequences for {backend.name}",
                            lambda: measure_slots(backend, ns, reps, backend_threads(backend)), refresh, log)
    return dict(zip(prof.ks, prof.cost)), prof.step_ms, key


def measure_slots(backend, ns: Sequence[int], reps: int, threads: int) -> tuple[float, list[float], float]:
    """(one-sequence step ms, [cost of a pass over n sequences / that step for n in ns], spread) of the llama.cpp
    model under `backend`, in a context of its own that shares the backend's weights."""
    gen = torch.Generator().manual_seed(0)
    ctx = LlamaCppSlots(backend.path, max(ns), SLOT_CONTEXT + 2, n_threads=threads, weights_of=backend)
    try:
        vocab = ctx.vocab_size
        # one prefix, copied to every sequence: feeding each its own took 20 s (passes in 32-token micro-batches)
        ctx.decode([(0, torch.randint(0, vocab, (SLOT_CONTEXT,), generator=gen).tolist(), 1)])
        for i in range(1, max(ns)):
            ctx.copy_sequence(0, i)
        times = {}
        for n in [1, *ns]:                          # the first n = 1 round warms up
            t = []
            # small passes are cheap and the one-sequence step scales every other cost: time them more often
            for _ in range(max(reps, min(16, 32 // n))):
                toks = torch.randint(0, vocab, (n,), generator=gen).tolist()
                t0 = time.perf_counter()
                ctx.decode([(i, [toks[i]], 1) for i in range(n)])
                t.append(time.perf_counter() - t0)
                for i in range(n):
                    ctx.remove(i, SLOT_CONTEXT)
            times[n] = t
    finally:
        ctx.close()
    return summarise_times(times, ns)


# -- the chance that a draft is accepted ---------------------------------------------------------------------
def copy_prior(n: float) -> float:
    """Prior P(accepted) of a copy-rule draft with match length n (measured on greedy continuations of novels and
    manuals, bench/results/copy_lengths.md, shrunk towards caution); the online counts take over quickly."""
    table = {0: 0.0, 1: 0.3, 2: 0.45, 3: 0.6, 4: 0.75, 5: 0.8, 6: 0.85, 7: 0.88, 8: 0.9, 9: 0.92, 10: 0.93,
             11: 0.94}
    return table.get(int(n), 0.96)


def probability_prior(score: float) -> float:
    """A score that estimates P(accepted) itself (a calibrated gate, a small model's max-probability)."""
    return min(max(float(score), 0.0), 1.0)


DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24)   # a draft's place in its chain, in buckets: 1, 2, 3, 4, 5-6, ..., 25+


def depth_bucket(depth: int) -> int:
    return sum(depth > d for d in DEPTHS)


@dataclass
class Acceptance:
    """P(draft accepted | every earlier draft of its pass was accepted), per score bin, place in the chain (depth,
    bucketed) and decoding mode (greedy or sampled): a Beta posterior updated with every verified draft. Its prior
    (`strength` pseudo-counts) is, for a chain's first draft, the policy's own estimate `prior(score)` (halved when
    sampled); for a deeper draft, the posterior of the bucket before it, so that a deep draft starts as likely as a
    shallow one and its own counts take over: a copy deep in a chain is a different population (the end of a
    repeated passage) from a copy that has just begun. It lives as long as its policy, so a batch learns over all
    its prompts."""
    prior: Callable[[float], float] = probability_prior
    bin: Callable[[float], int] = lambda s: min(int(s * 20), 19) if s >= 0 else -1
    strength: float = 4.0
    sampled_prior: float = 0.5                   # sampled decoding: a draft is kept with chance q(x) <= 1, less
    counts: dict = field(default_factory=dict)   # (sampled, bin, depth bucket) -> [accepted, verified]

    def p(self, score: float, sampled: bool = False, depth: int = 1) -> float:
        b = self.bin(score)
        q = self.prior(score) * (self.sampled_prior if sampled else 1.0)
        for bucket in range(depth_bucket(depth) + 1):
            a, n = self.counts.get((sampled, b, bucket), (0, 0))
            q = (a + self.strength * q) / (n + self.strength)
        return q

    def update(self, score: float, accepted: float, sampled: bool = False, depth: int = 1) -> None:
        """One verified draft at this depth of its chain: accepted is 0/1, or the chance it had (a sampled check,
        a shadow label)."""
        c = self.counts.setdefault((sampled, self.bin(score), depth_bucket(depth)), [0, 0])
        c[0] += float(accepted)
        c[1] += 1

    def learned(self) -> dict:
        """What the counts say, for the ledger: {"bin/depth bucket": [accepted, verified]} (greedy and sampled)."""
        return {f"{'sampled ' if s else ''}{b}/{DEPTHS[d] if d < len(DEPTHS) else str(DEPTHS[-1] + 1) + '+'}":
                [round(a, 2), n] for (s, b, d), (a, n) in sorted(self.counts.items())}


def copy_acceptance() -> Acceptance:
    return Acceptance(prior=copy_prior, bin=lambda n: int(n))


def useful_chain(profile: CostProfile, share: float = CEILING_SHARE) -> int:
    """The longest chain worth drafting on this cost curve: one less than the shortest pass whose ceiling
    n / cost(n) is within `share` of the best ceiling up to MAX_CHAIN + 1 tokens. Past it a longer pass barely
    raises what a perfect drafter could gain, while one wrong draft throws more tokens away: on the packaged Q4_1
    file the ceiling flattens near 16 tokens; on a flat (GPU-like) curve it keeps rising, and so do the chains."""
    ns = range(2, MAX_CHAIN + 2)
    best = max(profile.ceiling(n) for n in ns)
    return next(n for n in ns if profile.ceiling(n) >= share * best) - 1


# -- the planner -----------------------------------------------------------------------------------------------
@dataclass
class Planner:
    """Decides, draft by draft, whether to propose more and where to cut a chain (docs/speed.md).

    The loop calls `extend(probs)` after each proposal with the acceptance chances of the chain so far (the new
    draft last): True = propose another. Before the verify pass it calls `cut(probs)`: how many drafts to keep;
    after it, `observe_cycle` with what the pass yielded. `start_chain()` says whether to propose at all at a
    chain's start (a drafter whose proposals have not paid for their cost is asked every PROBE-th time only).

    A chain of k drafts yields tokens at rate(k) = (1 + S_k) / (cost[k + 1] + D m), m the proposals it still needs
    (those made are spent either way); the planner keeps the k of the highest rate, and only when it yields `margin`
    tokens more than plain steps would in the same time. The rate is the chain's own, not the run's: the tokens at
    stake would otherwise cost plain steps, however fast long copies elsewhere made the run (pricing them at the
    run's rate, Dinkelbach-style, cut most short chains on copy-rich text: docs/speed.md)."""
    profile: CostProfile
    acceptance: Acceptance = field(default_factory=Acceptance)
    draft_ms: float = 0.0              # the drafter's cost per proposal (mean), in ms
    proposals: int = 0
    max_chain: int | None = None       # None: from the cost curve (useful_chain)
    backoff: bool = True               # False: a free source (the copy rule), asked at every chain start
    margin: float = 0.1                # tokens a chain must gain over no draft to be kept
    start_gain: float = 0.0            # running mean of what proposing at a chain's start gained (tokens)
    starts: int = 0                    # chain starts observed, and skipped since the last probe
    skipped: int = 0
    interval: int = PROBE              # starts between probes while proposing does not pay
    tokens: float = 20.0               # tokens and cost (steps) of the passes so far, from a prior of 20 steps
    cost: float = 20.0                 # at rate 1: the achieved rate lam = tokens / cost
    stats: dict = field(default_factory=lambda: dict(chains=0, kept=0, cut_to_zero=0, skipped_starts=0,
                                                     free_drafts=0))

    def __post_init__(self):
        if self.max_chain is None:
            self.max_chain = useful_chain(self.profile)

    @property
    def d(self) -> float:
        """Drafter cost per proposal in steps."""
        return self.draft_ms / self.profile.step_ms

    @property
    def lam(self) -> float:
        """The rate the run achieves so far (tokens per step), for the ledger."""
        return min(max(self.tokens / self.cost, 1.0), 4.0)

    def observe_draft_time(self, seconds: float) -> None:
        """One proposal's wall time: draft_ms is the mean over all (a first call that indexes the prompt is
        diluted, not remembered)."""
        self.proposals += 1
        self.draft_ms += (seconds * 1000 - self.draft_ms) / self.proposals

    def observe_cycle(self, tokens: int, fed: int, proposals: int) -> None:
        """A pass fed `fed` tokens after `proposals` proposals and the text grew by `tokens`."""
        cost = self.profile.of(max(fed, 1)) + self.d * proposals
        self.tokens += tokens
        self.cost += cost
        if proposals:                          # what proposing gained over plain steps in the same time
            gain = tokens - cost
            self.starts += 1
            self.start_gain += (gain - self.start_gain) / min(self.starts, 32)

    def pass_cost(self, k: int, more: int = 0) -> float:
        """Cost in steps of a pass of k drafts that needs `more` proposals first (those made are spent either way)."""
        return self.profile.of(k + 1) + self.d * more

    def rate(self, expected: float, k: int, more: int = 0) -> float:
        """Tokens per step of that pass, `expected` of its drafts accepted."""
        return (1 + expected) / self.pass_cost(k, more)

    def pays(self, expected: float, k: int, more: int = 0) -> bool:
        """Does it yield `margin` tokens more than plain steps in the same time?"""
        return 1 + expected - self.pass_cost(k, more) > self.margin

    def best(self, probs: Sequence[float]) -> tuple[int, float]:
        """(k, rate) of the best cut of a chain whose conditional acceptance chances are probs (k = 0: none)."""
        best_k, best_r = 0, 1.0
        chain, expected = 1.0, 0.0
        for k, q in enumerate(probs, 1):
            chain *= q
            expected += chain
            r = self.rate(expected, k)
            if r > best_r and self.pays(expected, k):
                best_k, best_r = k, r
        return best_k, best_r

    def extend(self, probs: Sequence[float], future: Callable[[int], float] | None = None,
               free: bool = False) -> bool:
        """Propose another draft after these? Yes while a longer chain could beat the best cut of this one
        (counting the proposals it needs at the drafter's cost, none when a free source makes them), its drafts at
        depth j as likely as future(j) says (default: as the last)."""
        k = len(probs)
        if k >= self.max_chain or not probs or probs[-1] <= 0:
            return False
        _, now = self.best(probs)
        chain, expected = 1.0, 0.0
        for q in probs:
            chain *= q
            expected += chain
        for j in range(1, self.max_chain - k + 1):
            chain *= future(k + j) if future is not None else probs[-1]
            expected += chain
            more = 0 if free else j
            if self.rate(expected, k + j, more) > now and self.pays(expected, k + j, more):
                return True
            if chain < 1e-3:
                break
        return False

    def cut(self, probs: Sequence[float]) -> int:
        if not probs:                          # nothing was proposed: no chain
            return 0
        k, _ = self.best(probs)
        self.stats["chains"] += 1
        self.stats["kept"] += k
        self.stats["cut_to_zero"] += k == 0
        return k

    def start_chain(self) -> bool:
        """Propose at this chain start? Not while a drafter that costs over 1% of a step has lost time on average
        (after 8 starts), except at probes (every PROBE-th start, then twice, four times, ... up to 64 times rarer
        while they keep failing), which keep the estimate current."""
        if self.backoff and self.d > 0.01 and self.starts >= 8 and self.start_gain < 0:
            if self.skipped < self.interval - 1:
                self.skipped += 1
                self.stats["skipped_starts"] += 1
                return False
            self.interval = min(2 * self.interval, MAX_PROBE_GAP)   # probes that keep failing come rarer
        else:
            self.interval = PROBE
        self.skipped = 0
        return True


__all__ = ["CostProfile", "Acceptance", "Planner", "load_or_measure", "measure", "profile_key", "copy_acceptance",
           "copy_prior", "probability_prior", "PROFILE_KS", "QUICK_KS", "cache_file"]


# -- `train.py profile` ------------------------------------------------------------------------------------------
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "F16")


def requantized(gguf: Path, qtype: str) -> Path:
    """A copy of `gguf` requantized to qtype by llama.cpp (llama_model_quantize), cached beside the profiles.
    A requantized model is a different model: it is only profiled here, never swapped in silently."""
    st = gguf.stat()
    dst = cache_dir() / "requantized" / f"{gguf.stem}.{st.st_size}.{st.st_mtime_ns}.{qtype}.gguf"
    if dst.is_file():
        return dst
    lib = import_binding()
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    rc = lib.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize could not make a {qtype} copy of {gguf} (code {rc})")
    os.replace(tmp, dst)
    return dst


def main(argv=None) -> int:
    """`python train.py profile MODEL`: the cost of one pass feeding n tokens (a verify pass of n - 1 drafts),
    in one-token steps, for n = 1..32, on this machine; cached for decoding (`infer.py --verify` reads it)."""
    ap = argparse.ArgumentParser(prog="train.py profile", description=main.__doc__)
    ap.add_argument("model", help="packaged alias or .gguf file (llama.cpp), or any model (--backend hf)")
    ap.add_argument("--backend", default="llama.cpp", choices=tuple(BACKENDS))
    ap.add_argument("--threads", type=int, help="threads (default: one per core)")
    ap.add_argument("--hidden", action="store_true", help="with the last layer's hidden state on (what a gate "
                    "that reads it decodes with)")
    ap.add_argument("--reps", type=int, default=9, help="passes per length; the median counts (default 9)")
    ap.add_argument("--requant", nargs="*", default=[], metavar="TYPE", choices=QUANT_TYPES,
                    help=f"also profile copies requantized to these types ({', '.join(QUANT_TYPES)}): is this "
                    "file's format slow on this CPU? (the copies are cached, never used for decoding)")
    ap.add_argument("--refresh", action="store_true", help="measure again even if cached")
    ap.add_argument("--json", metavar="PATH", help="also write the profiles as JSON ('-': to stdout, the tables "
                    "then to stderr)")
    args = ap.parse_args(argv)
    if args.json:   # before measuring: a typo fails at once ('-' is stdout, as for infer.py --json)
        check_output_file(args.json, "--json", parents=False, stdout=True)
    tables = sys.stderr if args.json == "-" else sys.stdout
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.reps < 1:
        raise UsageError("--reps must be >= 1")
    if args.requant and args.backend != "llama.cpp":
        raise UsageError("--requant needs --backend llama.cpp")
    print(f"load average {os.getloadavg()[0]:.2f} (measure on an idle machine: other jobs inflate the costs)",
          file=sys.stderr)
    out = {}
    for label, backend in profiled_backends(args):
        key = profile_key(backend, args.hidden)
        with tqdm(total=len(PROFILE_KS) + 1, desc=label, unit="n", file=sys.stderr, leave=False) as bar:
            prof = load_or_measure(backend, args.hidden, PROFILE_KS, args.reps, args.refresh,
                                   log=lambda m: print(m, file=sys.stderr), progress=lambda k: bar.update())
        print(f"\n{label} ({backend.name}, {key['backend']}, {key['threads']} threads, measured {prof.measured})",
              file=tables)
        print(prof.table(), file=tables)
        out[label] = prof.to_dict()
        close = getattr(backend, "close", None)
        if close:
            close()
    if args.json == "-":
        sys.stdout.write(json_text(out))
    elif args.json:
        write_json(args.json, out)
    return 0


def cached(key: dict, ks: Sequence[int] = PROFILE_KS) -> CostProfile | None:
    """The cached profile of `key` if it covers the lengths ks (a damaged file counts as none)."""
    try:
        prof = CostProfile.from_dict(json.loads(cache_file(key).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prof if prof.key == key and set(ks) <= set(prof.ks) else None


def profiled_backends(args):
    """(label, backend) for the model and each requantized copy."""
    if args.backend == "hf":
        if args.threads:
            torch.set_num_threads(args.threads)
        yield args.model, open_models(args.model, [], "float32", "hf").big
        return
    path = gguf_path(args.model)
    yield f"{args.model} (as shipped)", LlamaCppBackend(path, name=str(path.name), n_threads=args.threads)
    for q in args.requant:
        copy = requantized(path, q)
        yield f"{args.model} requantized {q}", LlamaCppBackend(copy, name=copy.name, n_threads=args.threads)
