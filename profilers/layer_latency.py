"""Measured latency of single conv/linear layers (and attention cores) at given widths, on the target
backend, cached on disk.

Each entry is one layer built alone with the real kernel, stride, padding, groups mode, input spatial
size and batch, timed on the backend (ONNX Runtime, OpenVINO, TensorRT: a one-node graph; torch: the module), minus the
backend's per-call overhead measured on an Identity of the same input. Entries are cached in one JSON
file per (machine, backend, device, versions, batch, threads) fingerprint, so a table is reused across
models and runs and a different machine or version never reads another's numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from compressor import atomic
from compressor.errors import UserError

from . import sysinfo

LATENCY_BACKENDS = ("onnxruntime", "torch", "openvino", "tensorrt")


@dataclass(frozen=True)
class OpShape:
    """Everything about a layer but its widths."""

    kind: str  # "conv" | "linear" | "attention" (softmax(q k^T) v over heads; kernel = (head_dim,))
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    depthwise: bool = False
    spatial: tuple[int, ...] = ()  # conv: input H, W; linear: leading dims other than batch (tokens)
    bias: bool = True

    @property
    def key(self) -> str:
        return json.dumps([self.kind, self.kernel, self.stride, self.padding, self.dilation, self.depthwise,
                           self.spatial, self.bias])


def op_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, OpShape]:
    """OpShape of every conv/linear layer, from one forward pass (the spatial size each one sees), and of
    every timm attention core, named `<attention module>:core` (its width is the number of heads)."""
    seen: dict[str, OpShape] = {}
    handles = []
    attention = _timm_attention()

    def core_hook_for(name):
        def hook(m, args):
            seen[f"{name}:core"] = OpShape("attention", kernel=(int(m.head_dim),), spatial=(int(args[0].shape[1]),),
                                           bias=False)
        return hook

    def hook_for(name):
        def hook(m, args):
            x = args[0]
            if isinstance(m, nn.Conv2d):
                if m.groups not in (1, m.in_channels) or (m.groups > 1 and m.in_channels != m.out_channels):
                    seen[name] = OpShape("unsupported")
                    return
                seen[name] = OpShape("conv", tuple(m.kernel_size), tuple(m.stride), _pad(m), tuple(m.dilation),
                                     m.groups > 1, tuple(x.shape[2:]), m.bias is not None)
            else:
                seen[name] = OpShape("linear", spatial=tuple(x.shape[1:-1]), bias=m.bias is not None)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(hook_for(name)))
        elif attention is not None and isinstance(m, attention):
            handles.append(m.register_forward_pre_hook(core_hook_for(name)))
        elif isinstance(m, nn.modules.conv._ConvNd):
            raise UserError(f"latency-aware pruning handles 2-D convolutions; {name} is a {type(m).__name__}")
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return seen


def _timm_attention():
    try:
        from timm.layers import Attention
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return Attention


def _pad(m: nn.Conv2d) -> tuple[int, ...]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))  # "same" at stride 1
    return tuple(m.padding)


def _conv_module(op: OpShape, c_in: int, c_out: int) -> nn.Module:
    if op.kind == "conv":
        groups = c_in if op.depthwise else 1
        return nn.Conv2d(c_in, c_in if op.depthwise else c_out, op.kernel, op.stride, op.padding,  # type: ignore[arg-type]
                         op.dilation, groups=groups, bias=op.bias)  # type: ignore[arg-type]  # 2-tuples read from a Conv2d
    return nn.Linear(c_in, c_out, bias=op.bias)


def _input_shape(op: OpShape, batch: int, c_in: int) -> tuple[int, ...]:
    if op.kind == "attention":
        return (batch, c_in, *op.spatial, *op.kernel)  # batch, heads, tokens, head_dim
    return (batch, c_in, *op.spatial) if op.kind == "conv" else (batch, *op.spatial, c_in)


def _op_nodes(op: OpShape, c_in: int, c_out: int, p: str = "") -> tuple[list, list]:
    """ONNX nodes and initializers computing one layer from tensor `{p}x` into `{p}y` (names prefixed with
    `p`, so several layers can share one graph)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    x, y = f"{p}x", f"{p}y"
    if op.kind == "attention":  # q = k = v = x: the same shapes and work as the real core
        scale = numpy_helper.from_array(np.array(op.kernel[0] ** -0.5, np.float32), f"{p}scale")
        return [helper.make_node("Transpose", [x], [f"{p}xt"], perm=[0, 1, 3, 2], name=f"{p}t"),
                helper.make_node("MatMul", [x, f"{p}xt"], [f"{p}s"], name=f"{p}qk"),
                helper.make_node("Mul", [f"{p}s", f"{p}scale"], [f"{p}ss"], name=f"{p}mul"),
                helper.make_node("Softmax", [f"{p}ss"], [f"{p}p"], axis=-1, name=f"{p}softmax"),
                helper.make_node("MatMul", [f"{p}p", x], [y], name=f"{p}pv")], [scale]
    if op.kind == "conv":
        out_c = c_in if op.depthwise else c_out
        groups = c_in if op.depthwise else 1
        w = rng.standard_normal((out_c, c_in // groups, *op.kernel)).astype(np.float32) * 0.01
        inits = [numpy_helper.from_array(w, f"{p}w")]
        ins = [x, f"{p}w"]
        if op.bias:
            inits.append(numpy_helper.from_array(np.zeros(out_c, np.float32), f"{p}b"))
            ins.append(f"{p}b")
        pads = list(op.padding) * 2
        return [helper.make_node("Conv", ins, [y], kernel_shape=list(op.kernel), strides=list(op.stride),
                                 pads=pads, dilations=list(op.dilation), group=groups, name=f"{p}conv")], inits
    w = rng.standard_normal((c_in, c_out)).astype(np.float32) * 0.01
    inits = [numpy_helper.from_array(w, f"{p}w")]
    ns = [helper.make_node("MatMul", [x, f"{p}w"], [y if not op.bias else f"{p}m"], name=f"{p}matmul")]
    if op.bias:
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{p}b"))
        ns.append(helper.make_node("Add", [f"{p}m", f"{p}b"], [y], name=f"{p}add"))
    return ns, inits


class _OrtTimer:
    """One-node ONNX graphs built directly with onnx.helper (exporting each layer through torch.onnx would
    take seconds per entry; a table needs hundreds)."""

    node_timed = True  # op() reads the runtime's per-node profile, not the wall clock

    def __init__(self, threads: int | None):
        self.threads = threads
        self.reference_ms: float | None = None  # the reference conv's time every entry is scaled to

    @staticmethod
    def _graph(node_fn, x_shape, inputs: dict[str, tuple[int, ...]] | None = None) -> bytes:
        from onnx import TensorProto, helper

        nodes, inits = node_fn()
        ins = inputs or {"x": tuple(x_shape)}
        outs = [name.removesuffix("x") + "y" for name in ins]  # _op_nodes: `{p}x` in, `{p}y` out
        graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in ins.items()],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()

    def _session(self, node_fn, x_shape):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        return ort.InferenceSession(self._graph(node_fn, x_shape), sess_options=so, providers=["CPUExecutionProvider"])

    def op(self, op: OpShape, batch: int, c_in: int, c_out: int, min_time_s: float) -> float:
        """The layer's kernel time, run beside a fixed reference conv in one graph and scaled by the
        reference's first time: on a shared VM the machine's speed wanders by tens of percent between
        seconds (bench/runtime_noise.py), so an entry timed in a fast moment looked cheap, and a plan made
        of the entries that happened to look cheap ran 20-35 % slower than predicted (measured here: a
        ResNet-56 child's layers cost 0.43 of the parent's in the table, 0.52-0.53 re-timed side by side)."""
        x_shape = _input_shape(op, batch, c_in)
        ref_shape = (1, _REF_CHANNELS, *_REF.spatial)

        def nodes():
            a, wa = _op_nodes(op, c_in, c_out, "e_")
            b, wb = _op_nodes(_REF, _REF_CHANNELS, _REF_CHANNELS, "ref_")
            return a + b, wa + wb

        runs = _ort_profile_runs(self._graph(nodes, x_shape, {"e_x": x_shape, "ref_x": ref_shape}), self.threads,
                                 min_time_s, reference="ref_")
        ref = _central(runs[:, 1])
        if self.reference_ms is None:
            self.reference_ms = ref
        return float(self.reference_ms * _central(runs[:, 0] / np.maximum(runs[:, 1], 1e-6)))

    def overhead(self, shape: tuple[int, ...], min_time_s: float) -> float:
        from onnx import helper

        sess = self._session(lambda: ([helper.make_node("Identity", ["x"], ["y"])], []), shape)
        return _time(sess, shape, min_time_s)


_REF = OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (16, 16), False)  # the table's speed gauge
_REF_CHANNELS = 32


def _central(values: np.ndarray) -> float:
    """Mean of the middle half: ONNX Runtime's profiler counts whole microseconds, so a median of a few-µs
    kernel would move in steps."""
    kept = np.sort(np.asarray(values, dtype=float))
    q = len(kept) // 4
    return float(kept[q:len(kept) - q].mean())


def ort_node_ms(model: bytes | Path, threads: int | None, min_time_s: float = 0.2, max_runs: int = 500,
                batch: int = 1) -> float:
    """ms per run that ONNX Runtime's CPU provider spends in a graph's own kernels, read from its profiler,
    with the NCHWc layout reorders it adds at the graph's ends left out: what a layer or a block costs
    inside a network, where its neighbours already hold that layout (measured here: a 16-channel 3x3 conv
    at 32x32 ran 0.075 ms, its two reorders 0.025 ms more, and the wall clock added the per-call cost)."""
    return _central(_ort_profile_runs(model, threads, min_time_s, max_runs, batch)[:, 0])


def _ort_profile_runs(model: bytes | Path, threads: int | None, min_time_s: float, max_runs: int = 500, batch: int = 1,
                      reference: str | None = None) -> np.ndarray:
    """Per run after 2 warm-ups (at least 7, then until min_time_s or max_runs): ms of kernel time, and with
    `reference` a second column for the nodes whose names start with it."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="compress-ort-profile-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        feeds = {i.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else batch for d in i.shape]).astype(np.float32)
                 for i in sess.get_inputs()}
        warm, runs = 2, 0
        t_end = time.perf_counter() + min_time_s
        while runs < warm + 7 or (time.perf_counter() < t_end and runs < warm + max_runs):
            sess.run(None, feeds)
            runs += 1
        events = json.loads(Path(sess.end_profiling()).read_text())
    return _kernel_ms_per_run(events, reference)[warm:]


def _kernel_ms_per_run(events: list[dict], reference: str | None = None) -> np.ndarray:
    """ms of kernel time per run in an ONNX Runtime profile (its chrome-trace events), reorders left out;
    one column, or two where nodes named `reference...` are counted apart."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run = np.zeros((len(starts), 2 if reference else 1))
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if str(e.get("args", {}).get("op_name", "")).startswith("Reorder"):
            continue
        col = 1 if reference and e["name"].startswith(reference) else 0
        per_run[max(0, int(np.searchsorted(starts, e["ts"], side="right")) - 1), col] += e["dur"] / 1000.0
    return per_run


def ort_nchwc_alignment() -> tuple[int, int]:
    """(multiple, least) input channels for which ONNX Runtime's CPU provider runs a conv in its blocked
    NCHWc layout here, (1, 1) where it has none: read from the graph its optimizer writes for a probe conv,
    since the rule changes between versions (1.32: a multiple of 4 at or above the SIMD block, padded to
    the block). Off that path a conv runs as NCHW im2col, measured here ~2x slower (17 -> 17 channels of
    3x3 at 32x32: 0.15 ms; 24 -> 24: 0.13 ms), with layout conversions around it inside a network, which
    layers timed alone cannot show; so a width plan keeps to widths on the path."""
    import tempfile

    import onnx
    import onnxruntime as ort

    def blocked(c_in: int) -> bool:
        op = OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (8, 8), False)
        with tempfile.TemporaryDirectory(prefix="compress-nchwc-") as tmp:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            ort.InferenceSession(_OrtTimer._graph(lambda: _op_nodes(op, c_in, 16), (1, c_in, 8, 8)), sess_options=so,
                                 providers=["CPUExecutionProvider"])
            return any("nchwc" in n.domain for n in onnx.load(so.optimized_model_filepath).graph.node)

    block = sysinfo.channel_block()
    if block <= 1:
        return (1, 1)
    for multiple in (4, 8, 16):
        if multiple <= block and blocked(3 * block if multiple == block else block + multiple):
            return (multiple, block)
    return (1, 1)


class _OvTimer(_OrtTimer):
    """The same graphs compiled by OpenVINO in f32 on its CPU/GPU/NPU device. Compiling costs ~0.6 s a model
    on 2 cores (a 224x224 network's table needs thousands of entries), so entries are timed many to a
    compiled model: each layer its own input and output, its time read from OpenVINO's per-node
    performance counters (PERF_COUNT) rather than the wall clock. A node's counter is its kernel's own
    time, without the per-call cost of a request, which is what a layer costs inside a whole network."""

    CHUNK = 48  # layers per compiled model

    def __init__(self, device: str, threads: int | None):
        from exporters.openvino_export import require_openvino

        super().__init__(threads)
        self.ov, self.device = require_openvino(), device

    def _session(self, node_fn, x_shape):
        import io

        from exporters.openvino_export import compile_model_object

        compiled = compile_model_object(self.ov.convert_model(io.BytesIO(self._graph(node_fn, x_shape))), self.device,
                                        "f32", self.threads)
        return _OvSession(compiled)

    def op(self, op: OpShape, batch: int, c_in: int, c_out: int, min_time_s: float) -> float:
        return self.many([(op, batch, c_in, c_out)], min_time_s)[0]

    def many(self, jobs: list[tuple[OpShape, int, int, int]], min_time_s: float) -> list[float]:
        out: list[float] = []
        for i in range(0, len(jobs), self.CHUNK):
            out += self._chunk(jobs[i:i + self.CHUNK], min_time_s)
        return out

    def _chunk(self, jobs: list[tuple[OpShape, int, int, int]], min_time_s: float) -> list[float]:
        import io

        from onnx import TensorProto, helper

        from exporters.openvino_export import compile_model_object

        nodes, inits, ins, outs, feeds = [], [], [], [], {}
        rng = np.random.default_rng(1)
        for i, (op, batch, c_in, c_out) in enumerate(jobs):
            p = f"e{i}_"
            n, w = _op_nodes(op, c_in, c_out, p)
            nodes += n
            inits += w
            shape = list(_input_shape(op, batch, c_in))
            ins.append(helper.make_tensor_value_info(f"{p}x", TensorProto.FLOAT, shape))
            outs.append(helper.make_tensor_value_info(f"{p}y", TensorProto.FLOAT, None))
            feeds[f"{p}x"] = rng.standard_normal(shape).astype(np.float32)
        graph = helper.make_graph(nodes, "ops", ins, outs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        compiled = compile_model_object(self.ov.convert_model(io.BytesIO(model.SerializeToString())), self.device, "f32",
                                        self.threads, profiling=True)
        return _median_counters(compiled.create_infer_request(), feeds, [f"e{i}_" for i in range(len(jobs))],
                                min_time_s * len(jobs) ** 0.5, 200)


def network_node_ms(path: Path, backend: str, device: str, batch: int, threads: int | None,
                    min_time_s: float = 0.2) -> float:
    """ms an exported network spends in its own nodes on ONNX Runtime or OpenVINO, the runtime's layout
    reorders left out: what a subgraph (a residual block) costs inside a network, on the table's terms."""
    if backend == "onnxruntime":
        return ort_node_ms(path, threads, min_time_s, batch=batch)
    from exporters.openvino_export import compile_model

    compiled = compile_model(path, device, "f32", threads, batch, profiling=True)
    x = np.random.default_rng(1).standard_normal([int(d) for d in compiled.input(0).get_shape()]).astype(np.float32)
    return _median_counters(compiled.create_infer_request(), {0: x}, [""], min_time_s, 500)[0]


def _median_counters(request, feeds, prefixes: list[str], min_time_s: float, max_runs: int) -> list[float]:
    """Per prefix, the median over runs (7 at least, then until min_time_s or max_runs) of its nodes' ms."""
    for _ in range(2):
        request.infer(feeds)
    runs: list[list[float]] = []
    t_end = time.perf_counter() + min_time_s
    while len(runs) < 7 or (time.perf_counter() < t_end and len(runs) < max_runs):
        request.infer(feeds)
        runs.append(_per_prefix(request.profiling_info, prefixes))
    return [float(np.median([r[i] for r in runs])) for i in range(len(prefixes))]


def _per_prefix(info, prefixes: list[str]) -> list[float]:
    """ms of the executed nodes whose names start with each prefix, less the layout reorders the plugin
    adds at a graph's inputs and outputs: inside a network a layer's input and output already are in the
    layout its neighbours use (measured here: converting a 16-channel 32x32 output back to NCHW took
    0.041 ms, more than the 3x3 conv that made it, and happens once per network, not once per layer)."""
    total = dict.fromkeys(prefixes, 0.0)
    for node in info:
        if node.node_type == "Reorder":
            continue
        if str(node.status).endswith("EXECUTED") and not str(node.status).endswith("NOT_EXECUTED"):
            p = next((p for p in prefixes if node.node_name.startswith(p)), None)  # "e1_" never matches "e10_..."
            if p is not None:
                total[p] += node.real_time.total_seconds() * 1000.0
    return list(total.values())


class _OvSession:
    """ONNX Runtime's session.run signature over a compiled OpenVINO model, for _time."""

    def __init__(self, compiled):
        self.request = compiled.create_infer_request()

    def run(self, _outputs, feeds: dict):
        return self.request.infer({0: feeds["x"]})


class _TrtTimer(_OrtTimer):
    """The same one-node graphs, each built into a TensorRT engine (fp32, TF32 off: the precision the
    whole-model check runs at) for the exact batch, and timed with CUDA events. Building takes seconds per
    entry; the timing cache next to the table makes rebuilds of similar layers fast."""

    def __init__(self, timing_cache: Path | None):
        from exporters.tensorrt_export import require_tensorrt

        require_tensorrt()  # "not available here: ..." before any work
        super().__init__(None)
        self.timing_cache = timing_cache

    node_timed = False

    def op(self, op: OpShape, batch: int, c_in: int, c_out: int, min_time_s: float) -> float:
        x_shape = _input_shape(op, batch, c_in)
        return _time(self._session(lambda: _op_nodes(op, c_in, c_out), x_shape), x_shape, min_time_s)

    def _session(self, node_fn, x_shape):
        import tempfile

        from exporters.tensorrt_export import build_engine

        from .runners import TrtRunner

        with tempfile.TemporaryDirectory(prefix="compress-trt-layer-") as tmp:
            onnx_path, plan = Path(tmp) / "op.onnx", Path(tmp) / "op.plan"
            onnx_path.write_bytes(self._graph(node_fn, x_shape))
            b = x_shape[0]
            build_engine(onnx_path, plan, precision="fp32", shape=tuple(x_shape[1:]), min_batch=b, opt_batch=b,
                         max_batch=b, workspace_gb=1.0, timing_cache=self.timing_cache)
            return TrtRunner(plan, b)  # the engine is in memory from here on


def _time(sess, shape, min_time_s: float) -> float:
    """Median ms of one call: wall clock around an ONNX-Runtime-style run, or the runner's own clock (CUDA
    events for a TensorRT engine)."""
    if hasattr(sess, "time_once"):
        once = sess.time_once
    else:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)

        def once() -> float:
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            return (time.perf_counter() - t0) * 1000.0
    for _ in range(3):
        once()
    lat: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(lat) < 7 or (time.perf_counter() < t_end and len(lat) < 500):
        lat.append(once())
    return float(np.median(lat))


class _TorchTimer:
    node_timed = False

    def __init__(self, device: str, threads: int | None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from compressor.errors import NotAvailable

            raise NotAvailable("torch on CUDA", "no CUDA device (torch.cuda.is_available() is False)")
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _run(self, fn, x, min_time_s: float) -> float:
        for _ in range(3):
            fn(x)
        lat: list[float] = []
        t_end = time.perf_counter() + min_time_s
        cuda = self.device.type == "cuda"
        while len(lat) < 7 or (time.perf_counter() < t_end and len(lat) < 500):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(x)
                b.record()
                b.synchronize()
                lat.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn(x)
                lat.append((time.perf_counter() - t0) * 1000.0)
        return float(np.median(lat))

    def op(self, op: OpShape, batch: int, c_in: int, c_out: int, min_time_s: float) -> float:
        x = torch.randn(_input_shape(op, batch, c_in), device=self.device)
        if op.kind == "attention":  # timm's fused path
            return self._run(lambda t: nn.functional.scaled_dot_product_attention(t, t, t), x, min_time_s)
        m = _conv_module(op, c_in, c_out).to(self.device).eval()
        return self._run(m, x, min_time_s)

    def overhead(self, shape, min_time_s: float) -> float:
        x = torch.randn(shape, device=self.device)
        return self._run(lambda t: t.clone(), x, min_time_s)


def fingerprint(backend: str, device: str, batch: int, threads: int | None) -> dict:
    """What a measured table depends on: the same machine, backend, versions, batch and threads."""
    m = sysinfo.describe()
    gpu = (m.get("gpu") or {}).get("name") if device == "cuda" else None
    return {"cpu": m["cpu"].get("model"), "cpus": m["cpu"].get("usable_cpus"), "gpu": gpu, "backend": backend,
            "device": device, "batch": batch, "threads": threads,
            "versions": {k: m["versions"].get(k) for k in ("torch", "onnxruntime", "openvino", "tensorrt")}, "format": 1,
            **({"timing": _TIMING[backend]} if backend in _TIMING else {})}


_TIMING = {"openvino": "node-counters-without-reorders", "onnxruntime": "node-profile-without-reorders-vs-reference"}  # in fingerprints


GRID_POINTS = 6  # widths per axis measured per layer signature on a gridded backend


def _ceil(v: int, block: int) -> int:
    return -(-v // block) * block


def _spread(values: list[int], n: int) -> list[int]:
    """n of the values, evenly spaced by index, the smallest and largest included."""
    if len(values) <= n:
        return values
    return sorted({values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)})


class LayerLatency:
    """cost(op_key, c_in, c_out) in ms, measured lazily and cached. Call save() to keep new entries."""

    def __init__(self, backend: str, device: str, batch: int, threads: int | None = None,
                 cache_dir: Path | None = None, min_time_s: float = 0.02):
        if backend not in LATENCY_BACKENDS:
            raise UserError(f"`latency_backend` must be one of {', '.join(LATENCY_BACKENDS)} (got {backend})")
        if backend == "onnxruntime" and device != "cpu":
            raise UserError("`latency_backend` onnxruntime measures on the CPU here; use `latency_device` cpu "
                            "(or `latency_backend` torch `latency_device` cuda on a GPU)")
        if batch < 1:
            raise UserError("`latency_batch` must be >= 1")
        self.batch, self.min_time_s = batch, min_time_s
        if backend == "openvino" and device not in ("cpu", "gpu", "npu"):
            raise UserError("`latency_backend` openvino measures on OpenVINO's devices: `latency_device` cpu, gpu or npu")
        if backend == "tensorrt" and device != "cuda":
            raise UserError("`latency_backend` tensorrt measures on an NVIDIA GPU: use `latency_device` cuda")
        self.print = fingerprint(backend, device, batch, threads)
        digest = hashlib.sha256(json.dumps(self.print, sort_keys=True).encode()).hexdigest()[:16]
        self.path = None if cache_dir is None else Path(cache_dir) / f"latency-{backend}-{device}-b{batch}-{digest}.json"
        self.timer: _OrtTimer | _TorchTimer
        if backend == "onnxruntime":
            self.timer = _OrtTimer(threads)
        elif backend == "openvino":
            self.timer = _OvTimer(device, threads)
        elif backend == "tensorrt":
            self.timer = _TrtTimer(None if self.path is None else self.path.with_suffix(".trt-timing-cache"))
        else:
            self.timer = _TorchTimer(device, threads)
        self.entries: dict[str, float] = {}
        self.grids: dict[str, tuple[list[int], list[int], bool]] = {}  # signature -> the widths measured
        self.fits: dict[str, tuple[np.ndarray, float]] = {}  # signature -> (cost-form coefficients, least answer)
        self.aligned: dict[str, tuple[int, int]] = {}  # signature -> channels per block on each grid axis
        # OpenVINO's CPU convolutions compute output channels a SIMD block at a time: measured here, a 3x3
        # conv at 16x16 from 32 channels took 0.035 ms for 16 outputs, 0.058-0.062 for 17-23 and 0.051 for
        # 24 (input channels cost smoothly). So a conv's output axis is gridded on whole blocks and a
        # width is costed at its padded size.
        self.block = sysinfo.channel_block() if backend == "openvino" and device == "cpu" else 1
        self.overheads: dict[str, float] = {}
        self.ops: dict[str, OpShape] = {}
        self.measured = self.hits = 0
        self.measure_s = 0.0
        self.on_measure: Callable[[], None] | None = None  # progress callback
        if self.path is not None and self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("fingerprint") == self.print:
                    self.entries = {k: float(v) for k, v in doc.get("entries", {}).items()}
                    self.overheads = {k: float(v) for k, v in doc.get("overheads", {}).items()}
                    if hasattr(self.timer, "reference_ms") and doc.get("reference_ms"):
                        self.timer.reference_ms = float(doc["reference_ms"])  # new entries on the cached ones' scale
            except (json.JSONDecodeError, OSError, TypeError, ValueError, AttributeError):
                self.entries = {}  # an unreadable cache is rebuilt, not trusted

    def register(self, op: OpShape) -> str:
        self.ops[op.key] = op
        return op.key

    def __call__(self, key: str, c_in: int, c_out: int) -> float:
        entry = f"{key}|{c_in}|{c_out}"
        if key in self.fits:
            self.hits += 1
            return self._fitted(key, c_in, c_out)
        if entry in self.entries:
            self.hits += 1
            return self.entries[entry]
        t0 = time.perf_counter()
        ms = self._measure(key, c_in, c_out)
        self.measure_s += time.perf_counter() - t0
        if self.on_measure is not None:
            self.on_measure()
        return ms

    def _measure(self, key: str, c_in: int, c_out: int) -> float:
        op = self.ops[key]
        ms = self.timer.op(op, self.batch, c_in, c_out, self.min_time_s)
        if not self.timer.node_timed:  # wall clock: less the per-call cost (node times have none)
            ms = max(0.0, ms - self.overhead(_input_shape(op, self.batch, c_in)))
        self.entries[f"{key}|{c_in}|{c_out}"] = ms
        self.measured += 1
        return ms

    @functools.cached_property
    def align(self) -> tuple[int, int]:
        """(multiple, least) channel widths the runtime's fast conv kernels accept; (1, 1): any."""
        return ort_nchwc_alignment() if type(self.timer) is _OrtTimer else (1, 1)

    @property
    def node_timed(self) -> bool:
        """Entries are the runtime's own per-node times (no per-call cost, no layout reorders at the ends)."""
        return self.timer.node_timed

    @property
    def gridded(self) -> bool:
        """Answers every width from a cost form fitted to a grid of measured widths (use_grid), not from
        single entries: the runtimes' per-node times (ONNX Runtime, OpenVINO)."""
        return type(self.timer) in (_OrtTimer, _OvTimer)

    def use_grid(self, axes: dict[str, tuple[list[int], list[int], bool]], points: int = GRID_POINTS) -> None:
        """Measure each signature on a coarse grid of the (c_in, c_out) its layers can take (`points` widths
        per axis, the ends included; along the diagonal for depthwise layers and attention cores) and answer
        every width from the cost form fitted to that grid (_fit). Measured here: a small layer's single
        entry is mostly the profiler's per-node floor plus noise as large as the real step between widths
        (a depthwise 3x3 at 1x1 pixels, 928-960 channels: 9.7-11.2 us with no trend, cached entries 5.0 and
        8.4 us), so a planner reading single entries picks the ones that came out low and its child runs
        slower than promised (MobileNetV2 at 32x32: promised 4.76x, measured 1.85x). On OpenVINO the grid
        also saves a compile per planning step (minutes on a 224x224 network)."""
        wanted = []
        for key, (ins, outs, diagonal) in axes.items():
            bx, by = (self._block_for(key, ins) if diagonal else 1), self._block_for(key, outs)
            xs = _spread(sorted({_ceil(v, bx) for v in ins}), points)
            ys = xs if diagonal else _spread(sorted({_ceil(v, by) for v in outs}), points)
            self.grids[key] = (xs, ys, diagonal)
            self.aligned[key] = (bx, bx if diagonal else by)
            wanted += [(key, x, x) for x in xs] if diagonal else [(key, x, y) for x in xs for y in ys]
        self.prefetch(wanted)
        for key in axes:
            self.fits[key] = self._fit(key)

    def _block_for(self, key: str, values: list[int]) -> int:
        """A conv's output axis that moves is costed on whole channel blocks; a fixed width is measured as
        it is."""
        return self.block if self.ops[key].kind == "conv" and len(set(values)) > 1 else 1

    @staticmethod
    def _terms(x: np.ndarray, y: np.ndarray, diagonal: bool) -> np.ndarray:
        """The cost form's terms: per call, per input channel, per output channel, per MAC (in x out); a
        depthwise layer or attention core moves in and out together and costs per call + per channel."""
        one = np.ones_like(x, dtype=float)
        return np.stack([one, x] if diagonal else [one, x, y, x * y], axis=1).astype(float)

    def _fit(self, key: str) -> tuple[np.ndarray, float]:
        """Least squares on the grid's entries, weighted by 1/cost so every width counts by its relative
        error (a constant and three slopes from 36 entries: one entry's noise moves the answer a little).
        Hand-written: a four-term weighted fit is one numpy call; no library fits runtime cost forms."""
        xs, ys, diagonal = self.grids[key]
        pts = [(x, x) for x in xs] if diagonal else [(x, y) for x in xs for y in ys]
        m = np.array([self.entries[f"{key}|{x}|{y}"] for x, y in pts])
        a = np.array(pts, dtype=float)
        w = 1.0 / np.maximum(m, 1e-6)
        coef = np.linalg.lstsq(self._terms(a[:, 0], a[:, 1], diagonal) * w[:, None], m * w, rcond=None)[0]
        return coef, 0.5 * float(m.min())  # a width is never answered below half the cheapest measured

    def _fitted(self, key: str, c_in: int, c_out: int) -> float:
        xs, ys, diagonal = self.grids[key]
        bx, by = self.aligned.get(key, (1, 1))
        x = min(max(_ceil(c_in, bx), xs[0]), xs[-1])  # the grid spans every width the planner asks
        y = x if diagonal else min(max(_ceil(c_out, by), ys[0]), ys[-1])
        coef, least = self.fits[key]
        return max(float(self._terms(np.array([x]), np.array([y]), diagonal)[0] @ coef), least)

    def prefetch(self, wanted: list[tuple[str, int, int]]) -> None:
        """Measure the (signature, c_in, c_out) entries not cached yet: many to a compiled model where the
        backend times many layers per model (OpenVINO), else one by one."""
        missing = list(dict.fromkeys(w for w in wanted if f"{w[0]}|{w[1]}|{w[2]}" not in self.entries))
        if not missing:
            return
        t0 = time.perf_counter()
        if isinstance(self.timer, _OvTimer):
            for start in range(0, len(missing), _OvTimer.CHUNK):
                chunk = missing[start:start + _OvTimer.CHUNK]
                times = self.timer.many([(self.ops[k], self.batch, ci, co) for k, ci, co in chunk], self.min_time_s)
                for (k, ci, co), ms in zip(chunk, times):
                    self.entries[f"{k}|{ci}|{co}"] = ms
                self.measured += len(chunk)
                if self.on_measure is not None:
                    self.on_measure()
        else:
            for k, ci, co in missing:
                self._measure(k, ci, co)
                if self.on_measure is not None:
                    self.on_measure()
        self.measure_s += time.perf_counter() - t0

    def overhead(self, shape: tuple[int, ...]) -> float:
        """The backend's per-call cost (an Identity) on an input of this shape, in ms."""
        okey = json.dumps(list(shape))
        if okey not in self.overheads:
            self.overheads[okey] = self.timer.overhead(tuple(shape), self.min_time_s)
        return self.overheads[okey]

    def cached(self, key: str, measure_fn: Callable[[], float]) -> float:
        """An entry measured by the caller (e.g. a whole residual block), cached with the layers."""
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        t0 = time.perf_counter()
        self.entries[key] = float(measure_fn())
        self.measure_s += time.perf_counter() - t0
        self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.path, {"fingerprint": self.print, "entries": self.entries, "overheads": self.overheads,
                                          "reference_ms": getattr(self.timer, "reference_ms", None)})
        except OSError as e:
            raise UserError(f"cannot write the latency cache {self.path}: {e.strerror}") from None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "compress" / "latency"
