"""Is the machine quiet enough to time on? One check for every command that times (profile, latency-aware
pruning, matched-speedup compare).

Multi-threaded runtimes on oversubscribed cores distort latency far beyond a run's own interval (a parent
measured at 23 ms on a loaded 2-core machine ran in 3.8 ms on the quiet one), so three signs are watched:
- the load average against the CPUs this process may use, before and after timing;
- the spread of a target's own per-round medians within one measurement;
- the parent's latency against its own earlier measurement in the same run.
Any of them marks the measurement unreliable: latency-aware pruning then refuses to call a target reached,
and a profile says so on every figure, unless the user proceeds with --allow-busy (recorded with the result).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

LOAD_FACTOR = 1.5  # 1-minute load above 1.5 x usable CPUs: more runnable work than the cores serve
SPREAD = 2.0  # a target's slowest round median over its fastest, within one measurement
DRIFT = 2.0  # the parent's latency now over (or under) its earlier measurement in the same run


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


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

    def sample_load(self, when: str) -> None:
        load = load_average()
        if load is None:
            return
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

    def summary(self) -> str:
        return "; ".join(self.reasons[:3]) + (f" (and {len(self.reasons) - 3} more)" if len(self.reasons) > 3 else "")

    def to_json(self) -> dict[str, Any]:
        return {"quiet": self.quiet, "reasons": list(self.reasons), "load_average": dict(self.loads),
                "usable_cpus": self.cpus, "allow_busy": self.allow_busy,
                "thresholds": {"load_per_cpu": LOAD_FACTOR, "round_spread": SPREAD, "parent_drift": DRIFT}}
