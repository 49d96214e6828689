"""Shared by the benchmark scripts: run the real CLI, describe the machine, update docs/benchmarks.md.

Each script owns one section of docs/benchmarks.md, between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`;
re-running a script replaces only its own section.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RUNS = ROOT / "bench-runs"
FMNIST = "/usr/share/datasets/fashion-mnist"
sys.path.insert(0, str(ROOT))


REUSED: list[str] = []  # steps skipped because an earlier run of the script finished them (done=True)


def compress(*args, log: list[str] | None = None, done: bool = False, allow_fail: bool = False):
    """Run `compress ARGS` as a user would. Exits on failure, or with allow_fail returns 0 on success and
    the command's one-line error otherwise.

    done=True: the output already exists from an earlier run of this script; only log the command,
    so the section still lists every command behind its numbers.
    """
    cmd = ["compress", *map(str, args)]
    shown = " ".join(shlex.quote(c) for c in cmd).replace(str(ROOT) + "/", "")
    if log is not None:
        log.append(shown)
    if done:
        REUSED.append(shown)
        return
    print(f"$ {shown}", flush=True)
    exe = Path(sys.executable).parent / "compress"
    if allow_fail:
        r = subprocess.run([str(exe), *cmd[1:]], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        return 0 if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    r = subprocess.run([str(exe), *cmd[1:]], cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"benchmark step failed ({r.returncode}): {shown}")


def uniform_children(model: str, where: Path, log: list[str], *model_args) -> tuple[Path, list[Path]]:
    """A parent with fresh weights (latency does not depend on weight values) and its data-free l2
    children at 25/50/75 % in `where`."""
    parent = where / "parent"
    compress("prune", "--model", model, *model_args, "--num-classes", "10", "--sparsity", "0", "--out", parent,
             "--overwrite", "-q", log=log)
    kids = []
    for s in (25, 50, 75):
        kid = where / f"l2_{s}"
        compress("prune", "--model", parent, "--metric", "l2", "--sparsity", s / 100, "--out", kid, "--overwrite", "-q", log=log)
        kids.append(kid)
    return parent, kids


def machine() -> str:
    from profilers import sysinfo

    return sysinfo.one_line(sysinfo.describe())


def require_fashion_mnist() -> None:
    if not Path(FMNIST, "train-images-idx3-ubyte.gz").exists():
        sys.exit(f"Fashion-MNIST not found in {FMNIST} (apt-get install dataset-fashion-mnist)")


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_section(name: str, title: str, body: str, commands: list[str], started: float, script: str | None = None) -> None:
    """script: how to reproduce, when it is not `bench/NAME.py` alone (e.g. `latency_aware.py --only vit_cifar`)."""
    from compressor import atomic

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    mins = (time.time() - started) / 60
    took = f"the whole script took {mins:.0f} min" if mins >= 1 else "the whole script took under 1 min"
    if REUSED:  # the time would otherwise read as the cost of every command listed
        took += f", reusing {len(REUSED)} step(s) finished by an earlier run of it"
    section = (f"<!-- bench:{name} -->\n## {title}\n\nMeasured {stamp} on {machine()}; {took}.\n"
               f"Reproduce: `.venv/bin/python bench/{script or name + '.py'}`, which runs:\n\n```\n" + "\n".join(commands) + "\n```\n\n"
               f"{body.strip()}\n<!-- /bench:{name} -->")
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic.write_text(DOC, text)
    print(f"updated {DOC.relative_to(ROOT)} section '{name}'")


def mean_sd(values: list[float], n: int) -> str:
    """mean ± standard deviation over seeds; says how many seeds reached a value when some did not."""
    if len(values) < n:
        return f"reached by {len(values)}/{n} seeds"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def verdict(label: str, groups: dict[str, list[float]], n: int, test_images: int | None = None) -> str:
    """A difference is stated only where the spread supports it: means more than 2 standard errors (of the
    difference) apart. A mean's error is its seeds' spread plus, with `test_images`, the binomial error of
    an accuracy on that many images (a seed-independent score has no seed spread, but its test set is
    still a sample). Groups with fewer than n values are left out."""
    stats = {m: v for m, v in groups.items() if len(v) == n and n > 1}
    if len(stats) < 2:
        return f"{label}: fewer than two methods have all {n} seeds; no comparison."
    best = max(stats, key=lambda m: statistics.mean(stats[m]))

    def se(m: str) -> float:
        p = min(max(statistics.mean(stats[m]) / 100, 0.0), 1.0)
        sampling = p * (1 - p) / test_images * 100 ** 2 if test_images else 0.0
        return (statistics.variance(stats[m]) / len(stats[m]) + sampling) ** 0.5

    gap = lambda m: statistics.mean(stats[best]) - statistics.mean(stats[m])  # noqa: E731
    beaten = [m for m in stats if m != best and gap(m) > 2 * (se(best) ** 2 + se(m) ** 2) ** 0.5]
    tied = [m for m in stats if m != best and m not in beaten]
    return (f"{label}: {best} is highest" + (f"; ahead of {', '.join(beaten)} beyond 2 standard errors" if beaten else "")
            + (f"; no difference measured from {', '.join(tied)}" if tied else "") + ".")


def speedup_text(profile_dir: Path, target: str | None = None) -> str:
    """Every measured speedup of a `compress profile` run (of one target where given) as median [95% CI]
    (n.s. when the CI holds 1)."""
    res = [r for r in load(Path(profile_dir) / "profile.json")["results"] if target in (None, r["target"])]
    return " / ".join(f"{r['speedup']['median']:.2f}x [{r['speedup']['ci_low']:.2f}, {r['speedup']['ci_high']:.2f}]"
                      + ("" if r["speedup"].get("significant", True) else " n.s.") for r in res if r.get("speedup"))
