"""Issue 17: `kl` scoring now (each group's prefix run once, its units side by side, the calibration batches
preprocessed once) against the code before that change (one full forward pass per unit, batches
rebuilt every pass: commit a7811a2), side by side in one run; and ResNet-56 at the scale of do
Nascimento et al.'s protocol.

    .venv/bin/python bench/fast_kl.py

Timing does not depend on the weights: fresh ResNets, real digits images, 2 threads. Each measurement is
its own process (the code before is extracted from git into bench-runs/); both print their scores' digest,
and the ranks they give are compared.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BEFORE = "a7811a2"


def worker(arch: str, n: int, fast: bool) -> None:
    import torch

    from compressor import importance
    from compressor.data import DataSpec, InputSpec, load_dataset
    from compressor.models import ArchSpec, build
    from compressor.pruning import WidthConfig, planned_groups

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = InputSpec(3, 32, 32, (0.3054,) * 3, (0.376,) * 3)
    model = build(ArchSpec("compress", arch, {}), 10).eval()
    _, infos = planned_groups(model, spec, WidthConfig(metric="kl", sparsity=0.25))
    calib = load_dataset(DataSpec("digits")).calibration(n, 0)
    kw = {"fast": True} if fast else {}
    t0 = time.perf_counter()
    s = importance.kl_scores(model, infos, calib, spec, 64, "cpu", **kw)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    model(torch.zeros(64, 3, 32, 32))
    print(json.dumps({"s": dt, "units": sum(i.n_units for i in infos),
                      "scores": {f"{i}:{k[1]}": v.tolist() for i, (k, v) in enumerate(s.items())}, "pass64_s": time.perf_counter() - t1}))


if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, os.environ["KL_TREE"])
    worker(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "fast")
    sys.exit(0)

from common import ROOT, RUNS, md_table, write_section  # noqa: E402

started = time.time()
before_tree = RUNS / "fast_kl" / "before"
if not (before_tree / "compressor").is_dir():
    before_tree.mkdir(parents=True, exist_ok=True)
    subprocess.run(f"git -C {ROOT} archive {BEFORE} | tar -x -C {before_tree}", shell=True, check=True)


def measure(tree: Path, arch: str, n: int, fast: bool) -> dict:
    env = {**os.environ, "KL_TREE": str(tree), "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, __file__, "--worker", arch, str(n), "fast" if fast else "plain"], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def same_ranks(a: dict, b: dict) -> bool:
    import numpy as np

    # Keys hold module ids (per process); the groups come in the same order in both.
    return len(a) == len(b) and all(np.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(a.values(), b.values()))


pairs, agree = [], True
for _ in range(3):
    old = measure(before_tree, "resnet20", 256, False)
    new = measure(ROOT, "resnet20", 256, True)
    pairs.append((old["s"], new["s"]))
    agree &= same_ranks(old["scores"], new["scores"])
    print(f"resnet20, 256 images: before {old['s']:.1f} s, now {new['s']:.1f} s", flush=True)
ratios = sorted(n / o for o, n in pairs)
units20 = new["units"]

# ResNet-56: the fast path on 128 images; time is linear in the images, so 5,000 is extrapolated.
r56 = measure(ROOT, "resnet56", 128, True)
per_image_pass = r56["pass64_s"] / 64
rows = [[f"ResNet-20, {units20} units, 256 images", f"{statistics.median(o for o, _ in pairs):.1f} s",
         f"{statistics.median(n for _, n in pairs):.1f} s",
         f"{statistics.median(ratios):.3f} [{ratios[0]:.3f}, {ratios[-1]:.3f}]", "yes" if agree else "NO"]]
body = (
    "`compressor.importance.kl_scores` (what `compress prune --metric kl` runs), fresh weights, real digits images at "
    "32x32, 2 threads, calibration batches of 64, each timing its own process, interleaved, 3 pairs: *before* is the "
    f"code of commit {BEFORE} (one forward pass per unit, the batches rebuilt every pass), *now* the fast path "
    "(batches preprocessed once, each group's prefix once per batch, its units stacked along the batch axis; "
    "compressor/masked_eval.py). *now / before* is the median of the per-pair ratios [min, max].\n\n"
    + md_table(["model", "before (median)", "now (median)", "now / before", "same scores"], rows)
    + f"\n\nResNet-56 ({r56['units']} units): the fast path took {r56['s']:.0f} s on 128 images; time is linear in the "
      f"images, so do Nascimento et al.'s 5,000 would take about {r56['s'] * 5000 / 128 / 60:.0f} min on this CPU "
      f"(extrapolated, not run), against about {r56['units'] * per_image_pass * 5000 / 60:.0f} min for one full pass per "
      f"unit ({1000 * per_image_pass:.1f} ms per image per pass, measured). GPU: not measured (no GPU lent).\n")
write_section("fast_kl", "Fast kl scoring (issue 17)", body,
              [f"python bench/fast_kl.py  # times compressor.importance.kl_scores at {BEFORE} and now"], started)
