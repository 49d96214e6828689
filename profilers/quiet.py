"""Is the machine quiet enough to time on? One check for every command that times (profile, latency-aware
pruning, matched-speedup compare).

Multi-threaded runtimes on oversubscribed cores distort latency far beyond a run's own interval (a parent
measured at 23 ms on a loaded 2-core machine ran in 3.8 ms on the quiet one), so three signs are watched:
- other processes' share of the machine's CPU time, before and during timing (our own threads excluded, so a
  runtime's busy-waiting workers do not count; the load average against the usable CPUs where /proc is missing);
- the spread of a target's own per-round medians within one measurement;
- the parent's latency against its own earlier measurement in the same run.
Any of them marks the measurement unreliable: latency-aware pruning then refuses to call a target reached,
and a profile says so on every figure, unless the user proceeds with --allow-busy (recorded with the result).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

LOAD_FACTOR = 1.5  # where /proc/stat is missing: 1-minute load above 1.5 x usable CPUs
OTHERS_SHARE = 0.5  # other processes using more than half of the machine's CPU time while we time
SPREAD = 2.0  # a target's slowest round median over its fastest, within one measurement
DRIFT = 2.0  # the parent's latency now over (or under) its earlier measurement in the same run


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def cpu_times() -> tuple[int, int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process and its children, total jiffies), or None
    where /proc is missing. Our own threads (a runtime's busy-waiting workers included) are subtracted, so
    only other processes' work counts as a busy machine."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    total = sum(vals)
    own = sum(int(v) for v in st[11:15])  # utime, stime, cutime, cstime
    return total - vals[3] - vals[4], own, total  # idle and iowait are not busy


def others_share(since: tuple[int, int, int] | None, now: tuple[int, int, int] | None) -> float | None:
    """Share of the machine's CPU time that other processes used between two cpu_times() samples."""
    if since is None or now is None or now[2] <= since[2]:
        return None
    return max(0.0, (now[0] - since[0]) - (now[1] - since[1])) / (now[2] - since[2])


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class MachineCheck:
    allow_busy: bool = False
    cpus: int = field(default_factory=usable_cpus)
    loads: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    load_kind: str = "others_cpu_share"
    _since: tuple[int, int, int] | None = field(default=None, repr=False)

    def sample_load(self, when: str) -> None:
        """Before timing: other processes' CPU share over a short window; after: over the whole timing.
        Where /proc is missing, the 1-minute load average against the usable CPUs."""
        if when == "before":
            import time

            self._since = cpu_times()
            time.sleep(0.3)
        share = others_share(self._since, cpu_times())
        if share is not None:
            self.loads[when] = round(share, 3)
            if share > OTHERS_SHARE:
                self._add(f"other processes used {100 * share:.0f}% of the machine's CPU time {when} timing")
            return
        load = load_average()
        if load is None:
            return
        self.load_kind = "load_average"
        self.loads[when] = round(load, 2)
        if load > LOAD_FACTOR * self.cpus:
            self._add(f"load average {load:.1f} {when} timing on {self.cpus} usable CPU{'s' if self.cpus > 1 else ''}")

    def rounds(self, name: str, medians: list[float]) -> None:
        good = sorted(m for m in medians if m > 0)
        if len(good) >= 5:
            good = good[1:-1]  # one stray round (a page fault, a timer tick) is not a busy machine
        if len(good) >= 3 and good[-1] > SPREAD * good[0]:
            self._add(f"{name}'s round medians ranged {good[0]:.3g}-{good[-1]:.3g} ms within one measurement")

    def drift(self, name: str, earlier_ms: float, now_ms: float) -> None:
        if earlier_ms > 0 and now_ms > 0 and not (1 / DRIFT <= now_ms / earlier_ms <= DRIFT):
            self._add(f"{name} measured {earlier_ms:.3g} ms earlier in this run and {now_ms:.3g} ms later")

    def _add(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    @property
    def quiet(self) -> bool:
        return not self.reasons

    @property
    def unsteady_alone(self) -> bool:
        """Busy by the timings only, while no other process used the CPUs: the runtime switched speeds by
        itself (at batch 1 a two-thread ONNX Runtime pool on a 2-core VM ran 0.13-0.22 ms against a steady
        0.11 ms with one thread)."""
        return bool(self.reasons) and all("round medians" in r or "earlier in this run" in r for r in self.reasons)

    def summary(self) -> str:
        return "; ".join(self.reasons[:3]) + (f" (and {len(self.reasons) - 3} more)" if len(self.reasons) > 3 else "")

    def to_json(self) -> dict[str, Any]:
        return {"quiet": self.quiet, "reasons": list(self.reasons), "cpu_load": dict(self.loads), "cpu_load_kind": self.load_kind,
                "usable_cpus": self.cpus, "allow_busy": self.allow_busy,
                "thresholds": {"others_cpu_share": OTHERS_SHARE, "load_per_cpu": LOAD_FACTOR, "round_spread": SPREAD,
                               "parent_drift": DRIFT}}
