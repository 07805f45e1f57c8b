"""Speed is measured on a quiet machine: the load average before a benchmark, refused above QUIET unless forced.

    quiet = Quiet.check(force=args.force, what="bench/speed.py")   # exit 2 with one line when the machine is busy
    quiet.mark("big", before, after, other.cores)                    # load before/after each method, and the cores
                                                                     # other processes took meanwhile (common/cpu.py)
    quiet.to_dict(); quiet.note()                                   # what the result files say about the load

On 2 cores a benchmark that shares them with a test run or a build measures the contention, not the method
(docs/speed.md). The benchmark's own threads raise the load while it runs; what counts is the load before.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

QUIET = 0.5


def load() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class Quiet:
    before: float
    forced: bool = False
    marks: dict = field(default_factory=dict)     # method -> [load before, load after, most other cores] of its runs

    @classmethod
    def check(cls, force: bool, what: str) -> "Quiet":
        now = load()
        if now > QUIET and not force:
            print(f"{what}: error: load average {now} > {QUIET}: something else is running, so timings would "
                  "measure the contention; wait for an idle machine, or pass --force (the result then says "
                  "'measured under load')", file=sys.stderr)
            raise SystemExit(2)
        return cls(now, forced=now > QUIET)

    def mark(self, method: str, before: float, after: float, other: float | None = None) -> None:
        """Load before/after the method's last run; the most cores other processes took during any of its runs."""
        worst = max(x for x in (other, (self.marks.get(method) or [0, 0, None])[2], -1.0) if x is not None)
        self.marks[method] = [before, after, None if worst < 0 else worst]

    def to_dict(self) -> dict:
        return dict(loadavg_before=self.before, measured_under_load=self.forced, per_method=self.marks,
                    loadavg_end=load())

    def note(self) -> str:
        if self.forced:
            return f"**measured under load** (load average {self.before} before the run, > {QUIET})"
        return f"quiet machine: load average {self.before} before the run (refused above {QUIET})"
