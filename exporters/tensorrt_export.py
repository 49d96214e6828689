"""TensorRT engines built from our checked ONNX with the TensorRT Python API.

Precision lives in the ONNX graph. TensorRT 11 builds every network strongly typed; on TensorRT 10.12+
we ask for strong typing explicitly; on 10.x before 10.12 the network is weakly typed and the FP16/INT8
builder flags enable the graph's precision instead. One optimization profile covers the dynamic batch
axis; a timing cache file makes rebuilds fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from compressor import atomic
from compressor.errors import NotAvailable, UserError

INSTALL_HINT = ("pip install 'compress[tensorrt]' --extra-index-url https://pypi.nvidia.com "
                "(needs an NVIDIA GPU, driver and CUDA; see README 'TensorRT')")


def require_tensorrt():
    """The tensorrt module, or a one-line NotAvailable (exit 2) saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise NotAvailable("TensorRT", f"the tensorrt package is not installed: {INSTALL_HINT}") from None
    except Exception as e:  # the PyPI stub raises while trying to fetch the real wheel
        raise NotAvailable("TensorRT", f"tensorrt failed to import ({str(e).splitlines()[0][:120]}): {INSTALL_HINT}") from None
    import torch

    if not torch.cuda.is_available():
        raise NotAvailable("TensorRT", "no CUDA device (torch.cuda.is_available() is False)")
    return trt


def _version(trt) -> tuple[int, int]:
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return major, minor


def gpu_identity() -> dict:
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def build_engine(onnx_path: Path, out: Path, *, precision: str, shape: tuple[int, ...], min_batch: int = 1,
                 opt_batch: int = 8, max_batch: int = 64, workspace_gb: float = 4.0, timing_cache: Path | None = None,
                 version_compatible: bool = False) -> dict:
    trt = require_tensorrt()
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise UserError("need 1 <= `min_batch` <= `opt_batch` <= `max_batch`")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    ver = _version(trt)
    strongly_typed = ver >= (10, 12)
    flags = 0
    if strongly_typed and ver < (11, 0):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errs[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:  # TensorRT 10 before 10.12: precision through builder flags
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default: fp32 convolutions would round to 10-bit mantissas (~1e-2 off on a ResNet-20)
        # and fail the fp32 parity check.
        config.clear_flag(trt.BuilderFlag.TF32)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    inp = network.get_input(0)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    cache_note = _use_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see the TensorRT log above)")
    atomic.write_bytes(out, bytes(plan))
    if timing_cache is not None and (cache := config.get_timing_cache()) is not None:
        atomic.write_bytes(timing_cache, bytes(cache.serialize()))
    return {"tensorrt": trt.__version__, "gpu": gpu_identity(), "precision": precision,
            "strongly_typed": strongly_typed or ver >= (11, 0), "version_compatible": version_compatible,
            "profile": {"input": inp.name, "min": [min_batch, *shape], "opt": [opt_batch, *shape], "max": [max_batch, *shape]},
            "workspace_gb": workspace_gb, "timing_cache": None if timing_cache is None else str(timing_cache),
            "timing_cache_note": cache_note,
            "bytes": out.stat().st_size, "sha256": atomic.sha256_file(out)}


def _use_timing_cache(config, path: Path | None) -> str | None:
    """Load the timing cache file; one from another GPU or TensorRT version is refused by set_timing_cache
    (returns False), which would leave no cache at all: start a fresh one instead and say so."""
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return "reused" if data else "new"
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise UserError("TensorRT refused an empty timing cache")
    return f"{path} was built on another GPU or TensorRT version; started a fresh cache"


def set_batch(engine, context, name: str, shape) -> None:
    """set_input_shape, or one line naming the profile range (TensorRT returns False for a batch outside it
    and the next call fails with a negative dimension)."""
    if not context.set_input_shape(name, tuple(shape)):
        lo, _, hi = engine.get_tensor_profile_shape(name, 0)
        raise UserError(f"batch {shape[0]} is outside the engine's optimization profile (batch {lo[0]} to {hi[0]}); "
                        "rebuild it with compress export `min_batch`/`max_batch`")


def device_memory_bytes(engine) -> int:
    """TensorRT 10 has device_memory_size_v2 (and the deprecated device_memory_size); 11 only the former."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _sidecar(path: Path) -> dict:
    side = path.with_name(path.name + ".json")
    try:
        return json.loads(side.read_text()) if side.is_file() else {}
    except json.JSONDecodeError:
        return {}


def load_engine(path: Path, version_compatible: bool | None = None):
    """Deserialize an engine; a version or GPU mismatch gives that sentence, not a crash."""
    trt = require_tensorrt()
    side = _sidecar(path)
    if version_compatible is None:
        version_compatible = bool(side.get("tensorrt", {}).get("version_compatible"))
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    if version_compatible:
        runtime.engine_host_code_allowed = True  # our own version-compatible plan carries the lean runtime
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        built = side.get("tensorrt", {})
        here = gpu_identity()
        raise UserError(
            f"{path} cannot run here: an engine runs only on the TensorRT version and GPU kind that built it "
            f"(built with TensorRT {built.get('tensorrt', '?')} on {built.get('gpu', {}).get('name', '?')}; "
            f"this machine has TensorRT {trt.__version__} on {here['name']}); rebuild it here with compress export"
        )
    return engine


def run_engine(engine, x: np.ndarray) -> np.ndarray:
    """Run an engine on host inputs (for the correctness check, not for timing)."""
    import tensorrt as trt
    import torch

    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    outn = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    dt = torch.float16 if engine.get_tensor_dtype(inp) == trt.DataType.HALF else torch.float32
    xin = torch.from_numpy(x).to("cuda", dt).contiguous()
    set_batch(engine, ctx, inp, xin.shape)
    out = torch.empty(tuple(ctx.get_tensor_shape(outn)), device="cuda",
                      dtype=torch.float16 if engine.get_tensor_dtype(outn) == trt.DataType.HALF else torch.float32)
    ctx.set_tensor_address(inp, xin.data_ptr())
    ctx.set_tensor_address(outn, out.data_ptr())
    stream = torch.cuda.Stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise UserError("TensorRT execution failed")
    stream.synchronize()
    return out.float().cpu().numpy()


def engine_vs_onnx(engine_path: Path, onnx_path: Path, inputs: np.ndarray, max_batch: int,
                   version_compatible: bool = False) -> dict:
    from .onnx_export import compare, ort_session, run_ort

    engine = load_engine(engine_path, version_compatible)
    got = [np.concatenate([run_engine(engine, inputs[i:i + max_batch]) for i in range(0, len(inputs), max_batch)])]
    ref = run_ort(ort_session(onnx_path), inputs)
    return compare(ref, got).to_json()  # one output: multi-output models are refused before the build
