"""Issue 5: realised speedups of CIFAR-ResNet and ViT children at 25/50/75 % on this CPU (ONNX Runtime)."""

import time

from common import RUNS, compress, load, md_table, uniform_children, write_section

started = time.time()
log: list[str] = []
base = RUNS / "profile"
sections = []
for model in ("resnet56", "vit_cifar"):
    parent, kids = uniform_children(model, base / model, log)
    out = base / model / "report"
    compress("profile", *kids, "--baseline", parent, "--backend", "onnxruntime", "--batch-sizes", "1,32", "--rounds", "10",
             "--min-time", "0.5", "--out", out, "--overwrite", "-q", log=log)
    doc = load(out / "profile.json")
    rows = []
    for r in doc["results"]:
        sp = r["speedup"]
        rows.append([model, r["target"], r["batch_size"], f"{r['macs']:,}", "-" if not sp else f"{100 * sp['flops_reduction']:.1f}%",
                     "-" if not sp else f"{sp['flops_speedup']:.2f}x", f"{r['latency_ms']['p50']:.3f}",
                     "baseline" if not sp else f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]" + ("" if sp["significant"] else " n.s."),
                     "-" if not sp else f"{sp['realised_fraction']:.2f}"])
    sections.append(md_table(["model", "target", "batch", "MACs", "FLOPs red.", "FLOPs speedup", "p50 ms", "measured speedup [95% CI]",
                              "realised"], rows))
body = ("ONNX Runtime on the CPU, 10 interleaved rounds per target; children pruned uniformly with l2 "
        "(ViT: heads and FFN neurons, residual width kept). GPU rows are unmeasured: this session had no GPU.\n\n"
        + "\n\n".join(sections))
write_section("profile_speedups", "Realised speedups on this CPU (issue 5)", body, log, started)
