"""Was the machine quiet while we measured: the CPU time other processes took in that window, read from /proc.

    with OtherCPU() as other:          # /proc/stat (every process) less /proc/self/stat (this one, all threads)
        ...time something...
    other.cores                        # cores other processes kept busy on average over the window (None: unknown)
    other.quiet                        # cores <= QUIET_CORES

The 1-minute load average is the wrong witness for a timing: it counts this process's own work of the last minute
(a run that just measured something looks busy) and lags a neighbour that started a second ago (a busy machine
looks idle). The CPU time the others took during the window says whether they shared the cores while it ran.
"""
from __future__ import annotations

import os
import time

QUIET_CORES = 0.25   # other processes' mean busy cores above which a window counts as shared (a busy loop: ~1)
MIN_WINDOW = 0.2     # seconds


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def machine_busy_s() -> float | None:
    """Seconds of CPU time every process has used since boot (/proc/stat: user, nice, system, irq, softirq,
    steal), or None where /proc is not there."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / _ticks()


def own_busy_s() -> float | None:
    """Seconds of CPU time this process (all its threads) and its waited-for children have used."""
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])   # fields 14-17 of proc(5)
    return (utime + stime + cutime + cstime) / _ticks()


class OtherCPU:
    """A window over which the CPU time of other processes is counted; see the module docstring."""

    def __init__(self, limit: float | None = None):
        self.limit = QUIET_CORES if limit is None else limit
        self.cores: float | None = None
        self.wall_s = 0.0

    def __enter__(self) -> "OtherCPU":
        self._t0, self._all0, self._own0 = time.perf_counter(), machine_busy_s(), own_busy_s()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> float | None:
        """End the window (also done on leaving the with block); the other processes' mean busy cores."""
        self.wall_s = time.perf_counter() - self._t0
        all1, own1 = machine_busy_s(), own_busy_s()
        if None in (all1, own1, self._all0, self._own0) or self.wall_s <= 0:
            self.cores = None
        else:
            # both counters tick in 1/CLK_TCK steps (10 ms): a window under MIN_WINDOW is judged as if it were
            # that long, so a tick or two of rounding does not make it look busy
            other = (all1 - self._all0) - (own1 - self._own0)
            self.cores = round(max(0.0, other) / max(self.wall_s, MIN_WINDOW), 3)
        return self.cores

    @property
    def quiet(self) -> bool:
        """No other process took more than `limit` cores on average (unknown counts as quiet: nothing to go by)."""
        return self.cores is None or self.cores <= self.limit

    def describe(self) -> str:
        if self.cores is None:
            return "other processes' CPU time unknown (no /proc)"
        return f"other processes kept {self.cores:.2f} cores busy"
