"""CI gates on profile results: each failure is one line; any failure makes the command exit 1."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import UserError

from .document import ProfileDocument, ResultRow


@dataclass
class Gates:
    assert_speedup: float | None = None
    assert_realised: float | None = None
    max_latency_ms: float | None = None
    against: Path | None = None
    tolerance: float = 0.10
    batches: tuple[int, ...] | None = None  # speedup/realised/latency gates apply at these batch sizes only

    def active(self) -> bool:
        return any(v is not None for v in (self.assert_speedup, self.assert_realised, self.max_latency_ms, self.against))


def parse_tolerance(text: str) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UserError(f"`max_regression` must look like 10% or 0.1, got {text!r}") from None
    if v < 0:
        raise UserError("`max_regression` must be >= 0")
    return v


def _where(r: ResultRow) -> str:
    return f"{r.target} ({r.backend} {r.device}, batch {r.batch_size})"


def check(doc: ProfileDocument, g: Gates) -> list[str]:
    fails = []
    for r in doc.results:
        if r.target.startswith("reference:") or (g.batches is not None and r.batch_size not in g.batches):
            continue
        sp = r.speedup
        if g.assert_speedup is not None and sp is not None and sp.median < g.assert_speedup:
            fails.append(f"{_where(r)}: speedup {sp.median:.2f}x < required {g.assert_speedup:.2f}x")
        if g.assert_realised is not None and sp is not None and sp.realised_fraction is not None \
                and sp.realised_fraction < g.assert_realised:
            fails.append(f"{_where(r)}: realised fraction {sp.realised_fraction:.2f} < required {g.assert_realised:.2f}")
        if g.max_latency_ms is not None and r.latency_ms.p50 > g.max_latency_ms:
            fails.append(f"{_where(r)}: p50 latency {r.latency_ms.p50:.3f} ms > {g.max_latency_ms} ms")
    if g.against is not None:
        try:
            old = json.loads(Path(g.against).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read `against` {g.against}: {e}") from None
        prev = {(r["target"], r["backend"], r["device"], r["batch_size"]): r for r in old.get("results", [])}
        matched = 0
        for r in doc.results:
            p = prev.get((r.target, r.backend, r.device, r.batch_size))
            if p is None:
                continue
            matched += 1
            limit = p["latency_ms"]["p50"] * (1 + g.tolerance)
            if r.latency_ms.p50 > limit:
                fails.append(f"{_where(r)}: p50 {r.latency_ms.p50:.3f} ms regressed beyond {p['latency_ms']['p50']:.3f} ms "
                             f"+{100 * g.tolerance:.0f}%")
        if matched == 0:
            fails.append(f"--against {g.against}: no result matches a target/backend/batch of this run")
    return fails


def step_summary(markdown: str, failures: list[str], gates_active: bool) -> None:
    """Append to the GitHub Actions job summary when running there."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    text = markdown
    if failures:
        text += "\n### Gate failures\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    elif gates_active:
        text += "\nAll gates passed.\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
