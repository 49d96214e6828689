"""Latency-aware pruning of models that are not a library name (issue: your own model).

Two of tests/userpkg's networks, named as a user names their own code (`--model package.module:factory`):
a residual/depthwise CNN with a classification head and a dense segmentation-style head (two outputs),
and timm's resnet10t as a backbone under an in-house MLP head. Each is pruned for a measured 2x on ONNX
Runtime CPU at batch 1 and 32; the child is then reloaded in a fresh process (from the factory, as every
later command loads it) and exported to ONNX with parity over every output.
"""

import time

from common import RUNS, compress, load, md_table, write_section

started = time.time()
log: list[str] = []
base = RUNS / "own_model"
MODELS = [("tests.userpkg.nets:two_head", ["--model-arg", "width=32", "--model-arg", "blocks=3"], 64, "two outputs: logits 10, mask 3x32x32"),
          ("tests.userpkg.nets:timm_backbone", [], 64, "timm resnet10t under an MLP head")]
rows = []
for factory, args, size, what in MODELS:
    tag = factory.rsplit(":", 1)[1]
    for batch in (1, 32):
        out = base / f"{tag}_b{batch}"
        code = compress("prune", "--model", factory, *args, "--input-size", size, "--data", "fake", "--metric", "l2",
                        "--target-speedup", 2, "--latency-batch", batch, "--latency-cache", base / "cache",
                        "--out", out, "--overwrite", "-q", log=log, allow_fail=True)
        if code != 0:
            rows.append([f"`{factory}`", what, batch, "refused", "-", "-", "-", code])
            continue
        proof = load(out / "model.json")["metrics"]["latency"]
        onnx = base / f"{tag}_b{batch}.onnx"
        reload_ok = compress("export", out, "--format", "onnx", "--out", onnx, "--overwrite", log=log, allow_fail=True)
        side = load(str(onnx) + ".json") if reload_ok == 0 else {}
        agree = side.get("agreement", {})
        rows.append([f"`{factory}`", what, batch,
                     f"{proof['measured_speedup']:.2f}x [{proof['speedup_ci'][0]:.2f}, {proof['speedup_ci'][1]:.2f}]",
                     f"{100 * (proof['measured_speedup'] / 2 - 1):+.1f}%", f"{100 * proof['prediction_error']:+.1f}%",
                     len(proof["attempts"]),
                     f"reloaded; ONNX parity over {agree.get('outputs')} outputs, max abs diff {agree.get('max_abs_diff', float('nan')):.1e}"
                     if reload_ok == 0 else f"reload failed: {reload_ok}"])
body = md_table(["model (`--model`)", "what", "batch", "measured speedup [95% CI]", "vs 2x", "prediction error", "attempts",
                 "reload (fresh process)"], rows)
body += ("\n\nTarget 2x on ONNX Runtime CPU, metric l2, input 64x64, random weights (latency does not depend on them). "
         "The layers that produce each output keep their widths; every other channel group is sized by the latency table.")
write_section("own_model", "Your own model: latency-aware pruning by factory spec", body, log, started)
