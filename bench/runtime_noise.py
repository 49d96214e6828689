"""How steady one latency measurement is at batch 1, ONNX Runtime vs OpenVINO on this CPU (issue 30).

The latency model is judged against a child measured whole, minutes after the parent was calibrated; if
the runtime itself moves between measurements, no model can be closer than that. A ResNet-20 and a copy
at half its widths (8/16/32 channels), one thread, timed in interleaved 0.2-s windows for 40 s per
runtime: the spread of each model's window medians and of their ratio (what a paired speedup sees).

    .venv/bin/python bench/runtime_noise.py
"""

import tempfile
import time
from pathlib import Path

import numpy as np
from common import md_table, write_section  # puts the repository on sys.path

from compressor.models.cifar_resnet import CifarResNet
from profilers.paired import model_runner
from profilers.runners import measure

SECONDS = 40
started = time.time()
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for backend in ("onnxruntime", "openvino"):
        a = model_runner(CifarResNet(depth=20).eval(), backend, "cpu", 1, (3, 32, 32), Path(tmp), f"{backend}_a", 1)
        b = model_runner(CifarResNet(depth=20, width=8).eval(), backend, "cpu", 1, (3, 32, 32), Path(tmp), f"{backend}_b", 1)
        pa, pb = [], []
        t0 = time.time()
        while time.time() - t0 < SECONDS:
            pa.append(float(np.median(measure(a, 2, 20, 0.2))))
            pb.append(float(np.median(measure(b, 2, 20, 0.2))))
        ra, rb = np.array(pa), np.array(pb)

        def spread(v: np.ndarray, unit: str) -> str:
            p10, p50, p90 = np.percentile(v, [10, 50, 90])
            return f"{p10:.3f} / {p50:.3f} / {p90:.3f}{unit} ({100 * (p90 / p10 - 1):.0f} %)"
        rows.append([backend, len(ra), spread(ra, " ms"), spread(rb, " ms"), spread(ra / rb, "x")])
        print(rows[-1], flush=True)
body = (f"A ResNet-20 (16/32/64 channels) and a copy at half its widths, 32x32 inputs, batch 1, one thread, timed in "
        f"interleaved 0.2-s windows (each window's median) for {SECONDS} s per runtime. p10 / p50 / p90 of the "
        "windows, and in brackets how far p90 lies above p10.\n\n"
        + md_table(["runtime", "windows", "parent ms", "half-width copy ms", "ratio (paired speedup)"], rows))
write_section("runtime_noise", "How steady one measurement is at batch 1: ONNX Runtime vs OpenVINO (issue 30)", body,
              ["(in-process: bench/runtime_noise.py)"], started)
