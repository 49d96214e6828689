"""Issue 30: what a network's layers cost inside it, against the same layers timed alone (the latency table).

The latency model sums layers timed one at a time and maps the sum to whole-model milliseconds through a
curve measured on uniformly narrowed copies. Where a layer's cost inside the network is not its cost alone
times one factor for the whole model, a plan that narrows some layers and not others is mispredicted. Per
model (32x32, batch 1, ONNX Runtime, one thread): the parent, uniform l2 copies at 25/50/75 % and a
latency-aware 2x child (widths only); for each, its weights, its layers' table sum, the time ONNX Runtime's
profiler gives the whole network's nodes (its layout reorders left out, as in the table), and its paired
speedup over the parent by the wall clock.

    .venv/bin/python bench/in_network_cost.py
"""

import tempfile
import time
from pathlib import Path

from common import RUNS, compress, load, md_table, uniform_children, write_section  # puts the repository on sys.path

from compressor.modeldir import load_model_dir
from profilers.layer_latency import LayerLatency, _central, _ort_profile_runs, _OrtTimer, network_node_ms, op_shapes
from profilers.paired import exported, model_runner, paired

MODELS = ["resnet56", "torchvision:mobilenet_v2"]
started = time.time()
log: list[str] = []
base = RUNS / "in_network_cost"
cache = base / "cache"
rows = []


def table_sum(model, table: LayerLatency) -> float:
    """The layers' costs as the latency table has them, at the model's own widths."""
    modules = dict(model.named_modules())
    total = 0.0
    for name, op in op_shapes(model, (3, 32, 32)).items():
        m = modules[name.removesuffix(":core")]
        if op.kind == "conv":
            c_in, c_out = m.in_channels, m.out_channels
        elif op.kind == "linear":
            c_in, c_out = m.in_features, m.out_features
        else:  # attention core: its width is the head count
            c_in = c_out = int(m.num_heads)
        total += table(table.register(op), int(c_in), int(c_out))
    return total


for model in MODELS:
    safe = model.replace(":", "_")
    parent, kids = uniform_children(model, base / safe, log, "--input-size", "32", "--data", "fake")
    child = base / safe / "latency_x2"
    compress("prune", "--model", parent, "--metric", "l2", "--target-speedup", 2, "--latency-batch", 1, "--threads", 1,
             "--no-depth", "--latency-cache", cache, "--out", child, "--overwrite", "-q", log=log,
             done=(child / "model.json").exists())
    table = LayerLatency("onnxruntime", "cpu", 1, 1, cache)  # the table the 2x child was planned on
    with tempfile.TemporaryDirectory() as tmp:
        p = load_model_dir(parent).model.eval()
        pr = model_runner(p, "onnxruntime", "cpu", 1, (3, 32, 32), Path(tmp), "parent", 1)
        first = None
        for label, d in [("parent", parent)] + [(f"uniform l2 {s} %", k) for s, k in zip((25, 50, 75), kids)] + [("latency-aware 2x", child)]:
            m = load_model_dir(d).model.eval()
            weights = sum(t.numel() for t in m.parameters()) * 4 / 2**20
            alone = table_sum(m, table)
            inside = network_node_ms(exported(m, (3, 32, 32), Path(tmp), "net"), "onnxruntime", "cpu", 1, 1, min_time_s=0.5)
            r = model_runner(m, "onnxruntime", "cpu", 1, (3, 32, 32), Path(tmp), "copy", 1)
            check = paired(pr, r, rounds=7)
            sp = check["speedup"]
            r.close()
            if first is None:
                first = (alone, inside)
            note = ""
            if d == child:
                lat = load(child / "model.json")["lineage"][-1]["metrics"]["latency"]
                note = f"predicted {lat['predicted_speedup']:.2f}x, measured {lat['measured_speedup']:.2f}x when planned"
            rows.append([model, label, f"{weights:.2f}", f"{alone:.3f}", f"{alone / first[0]:.2f}", f"{inside:.3f}",
                         f"{inside / first[1]:.2f}", f"{inside / alone:.2f}", f"{check['child_ms']:.3f}",
                         f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]", note])
            print(rows[-1], flush=True)
        pr.close()
    table.save()

def profiler_cost_per_node() -> float:
    """What ONNX Runtime's profiler counts for a node that does almost nothing: a Relu on one number, 8 in a chain."""
    from onnx import helper

    names = ["x", *(f"t{i}" for i in range(1, 8)), "y"]
    nodes = [helper.make_node("Relu", [a], [b]) for a, b in zip(names, names[1:])]
    model = _OrtTimer._graph(lambda: (nodes, []), (1, 1))  # the table's own one-graph builder
    return _central(_ort_profile_runs(model, 1, 0.5)[:, 0]) / 8


relu_ms = profiler_cost_per_node()
body = ("Per model at 32x32, batch 1, ONNX Runtime on the CPU with one thread: *weights*, fp32 MiB; *alone*: the "
        "layers' costs in the latency table (each layer timed by itself, from ONNX Runtime's profiler), summed; "
        "*inside*: the profiler's time for every node of the whole exported network, layout reorders left out, "
        "per run; *ratio* columns against the parent; *inside/alone*; *wall ms*: the copy's median latency by the "
        "wall clock, profiler off; *speedup*: paired wall-clock speedup over the parent with its 96% interval (7 "
        "interleaved rounds).\n\n"
        f"ONNX Runtime's profiler counts {relu_ms * 1000:.1f} µs for a Relu on one number (8 in a chain, per node): "
        "a floor under every node time it reports, layers timed alone included.\n\n"
        + md_table(["model", "copy", "weights MiB", "alone ms", "alone vs parent", "inside ms", "inside vs parent",
                    "inside/alone", "wall ms", "speedup", "note"], rows))
write_section("in_network_cost", "What layers cost inside the network vs alone, batch 1 (issue 30)", body, log, started)
