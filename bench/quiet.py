"""Speed is measured on a quiet machine: other processes' CPU time just before a benchmark, refused when busy.

    quiet = Quiet.check(force=args.force, what="bench/speed.py")   # exit 2 with one line when the machine is busy
    quiet.mark("big", before, after, other.cores)                    # load before/after each method, and the cores
                                                                     # other processes took meanwhile (common/cpu.py)
    quiet.to_dict(); quiet.note()                                   # what the result files say about the load

On 2 cores a benchmark that shares them with a test run or a build measures the contention, not the method
(docs/speed.md). The load average is recorded too, but it counts this process's own work and the previous
command's, so it does not decide.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from common.cpu import OtherCPU

LOOK = 3.0   # seconds of other processes' CPU time looked at before a benchmark


def load() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class Quiet:
    before: float
    forced: bool = False
    others: float | None = None                   # cores other processes took just before the run
    marks: dict = field(default_factory=dict)     # method -> [load before, load after, most other cores] of its runs

    @classmethod
    def check(cls, force: bool, what: str) -> "Quiet":
        """Refuse (exit 2) when other processes keep the cores busy: their CPU time over LOOK seconds (common/cpu.py),
        not the load average alone, which also counts this process's and the previous command's own work."""
        now = load()
        with OtherCPU() as other:
            time.sleep(LOOK)
        busy = not other.quiet
        if busy and not force:
            print(f"{what}: error: {other.describe()} over {LOOK:.0f} s (load average {now}): something else is "
                  "running, so timings would measure the contention; wait for an idle machine, or pass --force (the "
                  "result then says 'measured under load')", file=sys.stderr)
            raise SystemExit(2)
        return cls(now, forced=busy, others=other.cores)

    def mark(self, method: str, before: float, after: float, other: float | None = None) -> None:
        """Load before/after the method's last run; the most cores other processes took during any of its runs."""
        seen = [x for x in (other, *self.marks.get(method, [None] * 3)[2:]) if x is not None]
        self.marks[method] = [before, after, max(seen, default=None)]

    def to_dict(self) -> dict:
        return dict(loadavg_before=self.before, other_cores_before=self.others, measured_under_load=self.forced,
                    per_method=self.marks, loadavg_end=load())

    def note(self) -> str:
        seen = f"other processes {self.others} cores over {LOOK:.0f} s, load average {self.before} before the run"
        if self.forced:
            return f"**measured under load** ({seen})"
        return f"quiet machine ({seen}; refused when others take more than 0.25 cores)"
