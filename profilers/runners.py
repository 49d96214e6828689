"""One inference at a time on each backend, timed the way that backend is timed correctly.

torch: CPU wall clock; CUDA events around the call with synchronisation, optionally a captured CUDA graph.
onnxruntime: CPU, CUDA or TensorRT execution provider; on GPUs input and output stay on the device
(I/O binding) unless transfers are asked for. tensorrt: a serialized engine run with execute_async_v3
on device buffers. openvino: a compiled model with the inference precision pinned (f32 unless asked),
static batch, one synchronous request.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from compressor.errors import NotAvailable, UserError

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")


class Runner:
    backend = "?"
    file_bytes: int | None = None

    def time_once(self) -> float:
        """Run one batch; return its latency in ms."""
        raise NotImplementedError

    def run(self) -> None:
        self.time_once()

    def device_peak_bytes(self) -> int | None:
        return None

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise NotAvailable(what, "no CUDA device (torch.cuda.is_available() is False)")


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: torch.nn.Module, shape, batch: int, device: str = "cpu", cuda_graphs: bool = False,
                 include_transfers: bool = False, seed: int = 0):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            require_cuda("torch on CUDA")
        # What this target itself allocates (weights + activations), whatever other targets left behind.
        self.base_alloc = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.model = model.eval().to(self.device)
        g = torch.Generator().manual_seed(seed)
        self.host = torch.randn(batch, *shape, generator=g)
        self.x = self.host.to(self.device)
        self.include_transfers = include_transfers
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        if self.device.type == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if cuda_graphs:
                self._capture()

    def _capture(self) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                self.model(self.x)
        torch.cuda.current_stream().wait_stream(s)
        graph = self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self.out = self.model(self.x)

    @torch.inference_mode()
    def time_once(self) -> float:
        if self.device.type == "cpu":
            t0 = time.perf_counter()
            self.model(self.x)
            return (time.perf_counter() - t0) * 1000.0
        self.start.record()
        if self.include_transfers:
            self.x.copy_(self.host, non_blocking=False)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:
            out = self.model(self.x)
        if self.include_transfers and out is not None:  # as the other backends: input host->device, output back
            out.cpu()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)

    def device_peak_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) - self.base_alloc

    def info(self) -> dict:
        return {"threads": torch.get_num_threads(), "cuda_graphs": self.graph is not None}

    def close(self) -> None:
        if self.device.type == "cuda":  # the next target's memory window must not hold this one's weights
            self.graph = self.out = None
            self.x = self.x.cpu()
            self.model.to("cpu")
            torch.cuda.empty_cache()


ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, batch: int, device: str = "cpu", threads: int | None = None,
                 provider: str | None = None, include_transfers: bool = False, seed: int = 0):
        import onnxruntime as ort

        from exporters.onnx_export import ort_session

        key = provider or device
        wanted = ORT_PROVIDERS.get(key)
        if wanted is None:
            raise UserError(f"unknown ONNX Runtime provider '{key}'")
        if wanted[0] not in ort.get_available_providers():
            raise NotAvailable(f"ONNX Runtime {wanted[0]}", f"this onnxruntime build offers {', '.join(ort.get_available_providers())} "
                                                            "(install onnxruntime-gpu for CUDA/TensorRT)")
        self.session = ort_session(onnx_path, wanted, threads)
        self.providers = self.session.get_providers()
        if self.providers[0] != wanted[0]:
            # ORT falls back silently (CPU for CUDA, CUDA for TensorRT) when a provider's libraries fail to
            # load: the rows would be mislabelled and I/O binding would point at the wrong device.
            raise NotAvailable(f"ONNX Runtime {wanted[0]}", f"the session fell back to {self.providers[0]} (its CUDA/"
                                                            "cuDNN/TensorRT libraries did not load; see ONNX Runtime's log)")
        inp = self.session.get_inputs()[0]
        shape = [batch] + [int(d) for d in inp.shape[1:]]
        dtype = np.float16 if "float16" in inp.type else np.float32
        self.x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
        # every output is fetched: ONNX Runtime skips the nodes of outputs nobody asked for
        self.name, self.out_names = inp.name, [o.name for o in self.session.get_outputs()]
        self.file_bytes = Path(onnx_path).stat().st_size
        self.gpu = wanted[0] != "CPUExecutionProvider"
        self.include_transfers = include_transfers
        if self.gpu and not include_transfers:
            # Input and output stay on the GPU: the timed region holds no host copies.
            self.binding = self.session.io_binding()
            self.x_dev = ort.OrtValue.ortvalue_from_numpy(self.x, "cuda", 0)
            self.binding.bind_ortvalue_input(self.name, self.x_dev)
            for name in self.out_names:
                self.binding.bind_output(name, "cuda")

    def time_once(self) -> float:
        t0 = time.perf_counter()
        if self.gpu and not self.include_transfers:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        else:
            self.session.run(self.out_names, {self.name: self.x})
        return (time.perf_counter() - t0) * 1000.0

    def info(self) -> dict:
        so = self.session.get_session_options()
        return {"providers": self.providers, "intra_op_threads": so.intra_op_num_threads}


class OvRunner(Runner):
    backend = "openvino"

    def __init__(self, path: Path, batch: int, device: str = "cpu", threads: int | None = None, precision: str = "f32",
                 seed: int = 0):
        from exporters import openvino_export as ovx

        self.compiled = ovx.compile_model(path, device, precision, threads, batch)
        self.precision = ovx.applied_precision(self.compiled)
        if self.precision != precision:
            # The plugin ignores a hint the hardware cannot honour: the rows would be mislabelled.
            raise NotAvailable(f"OpenVINO {device.upper()} in {precision}", f"the plugin computes in {self.precision} here")
        self.request = self.compiled.create_infer_request()
        shape = [int(d) for d in self.compiled.input(0).get_shape()]
        self.x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        p = Path(path)
        self.file_bytes = sum(f.stat().st_size for f in (p, p.with_suffix(".bin")) if f.is_file()) if p.suffix == ".xml" \
            else p.stat().st_size
        self.device, self.version = device, ovx.version()

    def time_once(self) -> float:
        t0 = time.perf_counter()
        self.request.infer({0: self.x})
        return (time.perf_counter() - t0) * 1000.0

    def info(self) -> dict:
        return {"openvino": self.version, "device": self.device.upper(), "inference_precision": self.precision,
                "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS"))}


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_path: Path, batch: int, include_transfers: bool = False, seed: int = 0):
        from exporters.tensorrt_export import load_engine, set_batch

        require_cuda("the TensorRT runtime")
        import tensorrt as trt

        self.engine = load_engine(engine_path)
        self.context = self.engine.create_execution_context()
        self.file_bytes = Path(engine_path).stat().st_size
        self.include_transfers = include_transfers
        self.buffers, self.host = {}, {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        g = torch.Generator().manual_seed(seed)
        for name in names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                dims = list(self.engine.get_tensor_shape(name))
                dims[0] = batch
                set_batch(self.engine, self.context, name, dims)
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            dt = torch.float16 if self.engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
            self.buffers[name] = torch.empty(shape, dtype=dt, device="cuda")
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.host[name] = torch.randn(shape, generator=g).to(dt).pin_memory()
                self.buffers[name].copy_(self.host[name])
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.stream = torch.cuda.Stream()
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def time_once(self) -> float:
        with torch.cuda.stream(self.stream):
            self.start.record(self.stream)
            if self.include_transfers:
                for name, h in self.host.items():
                    self.buffers[name].copy_(h, non_blocking=True)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise UserError("TensorRT execute_async_v3 failed")
            if self.include_transfers:
                for name in self.outputs:
                    self.buffers[name].to("cpu", non_blocking=True)
            self.end.record(self.stream)
        self.end.synchronize()
        return self.start.elapsed_time(self.end)

    def device_peak_bytes(self) -> int | None:
        from exporters.tensorrt_export import device_memory_bytes

        return device_memory_bytes(self.engine)

    def info(self) -> dict:
        import tensorrt as trt

        return {"tensorrt": trt.__version__}


def measure(runner: Runner, warmup: int, min_iters: int, min_time_s: float, max_iters: int = 100_000) -> list[float]:
    """Warm up, then iterate until both the count and the duration minimums are met (as trtexec does)."""
    for _ in range(max(warmup, 0)):
        runner.run()
    lat: list[float] = []
    t0 = time.perf_counter()
    while len(lat) < min_iters or (time.perf_counter() - t0) < min_time_s:
        lat.append(runner.time_once())
        if len(lat) >= max_iters:
            break
    return lat
