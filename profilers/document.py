"""The profile document as types: what `compress profile --json` writes and profile.schema.json describes.

The session builds these; `to_json()` is the only way out to disk, reports and gates, so the JSON that
readers see and the fields the code fills cannot drift apart (tests check them against the schema).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .energy import EnergyResult

SCHEMA = "compress-profile/1"


@dataclass
class Latency:
    """Per-image latency statistics of one row, in ms."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    n: int


@dataclass
class Memory:
    peak_rss_mb: float
    peak_rss_delta_mb: float | None
    device_peak_mb: float | None
    file_bytes: int | None


@dataclass
class Speedup:
    """Baseline/target over interleaved rounds (median and its order-statistic interval), next to the
    FLOPs speedup it was meant to buy."""

    vs: str
    median: float
    ci_low: float
    ci_high: float
    confidence: float
    significant: bool
    rounds: int
    ratios: list[float]
    flops_speedup: float | None
    flops_reduction: float | None
    realised_fraction: float | None


@dataclass
class ResultRow:
    """One target on one backend at one batch size."""

    target: str
    backend: str
    device: str
    batch_size: int
    inference_precision: str | None  # OpenVINO's applied precision; None on the other backends
    latency_ms: Latency
    throughput_ips: float
    round_medians_ms: list[float]
    memory: Memory
    runner: dict[str, Any]  # backend-specific settings the runner applied
    top1: float | None
    params: int | None
    macs: int | None
    energy: EnergyResult
    speedup: Speedup | None = None


@dataclass
class Skipped:
    target: str
    backend: str
    reason: str


@dataclass
class ProfileDocument:
    created: str
    command: str
    machine: dict[str, Any]  # profilers.sysinfo.describe()
    settings: dict[str, Any]
    baseline: str | None
    targets: list[dict[str, Any]]  # Target.to_json()
    results: list[ResultRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)  # narrow layers per target
    gates: list[dict[str, str]] = field(default_factory=list)  # {"failure": line}, set by the command
    machine_check: dict[str, Any] = field(default_factory=dict)  # profilers.quiet.MachineCheck.to_json()
    schema: str = SCHEMA

    def row(self, target: str, backend: str | None = None, batch_size: int | None = None) -> ResultRow:
        """The first row of `target` (on `backend`, at `batch_size` where given)."""
        for r in self.results:
            if r.target == target and backend in (None, r.backend) and batch_size in (None, r.batch_size):
                return r
        raise KeyError(f"no result for {target} on {backend or 'any backend'} at batch {batch_size or 'any'}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": d.pop("schema"), **d}  # the schema id first, as readers expect to see it
