"""Process memory: current and peak resident set size (Linux /proc), with the peak reset per target."""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def reset_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where not supported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:  # non-Linux: lifetime peak from getrusage
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


class PeakWindow:
    """Peak RSS reached inside a `with` block, and its rise over the RSS at entry."""

    def __enter__(self):
        self.resettable = reset_peak()
        self.start = rss_mb() or 0.0
        return self

    def __exit__(self, *exc):
        self.peak = peak_rss_mb()
        self.delta = max(0.0, self.peak - self.start) if self.resettable else None
        return False
