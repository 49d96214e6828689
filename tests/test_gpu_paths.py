"""The GPU, TensorRT, NVML and Jetson paths, run on a CPU machine through fakes of those APIs at their
boundary: the logic is ours and real; only what the fake answers is made up. The real thing runs in
test_export/test_profile where a GPU and TensorRT exist, and in bench/gpu_check.py."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from compressor.errors import NotAvailable, UserError
from profilers import energy


# ----------------------------------------------------------------------------- a fake tensorrt
def fake_tensorrt(version: str, cache_from_elsewhere: bytes = b"other-gpu") -> types.ModuleType:
    """The parts of the tensorrt module our builder touches, in the shape of `version`."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    trt.built = []  # (flags at creation, set builder flags) of every build

    class Flag:
        FP16, INT8, TF32, VERSION_COMPATIBLE = "FP16", "INT8", "TF32", "VERSION_COMPATIBLE"

    trt.BuilderFlag = Flag
    if major < 11:  # TensorRT 11 builds every network strongly typed and dropped the creation flag
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Logger:
        WARNING, ERROR = 1, 2

        def __init__(self, level):
            pass

    class Input:
        name, shape = "input", (-1, 3, 16, 16)

    class Network:
        def __init__(self, flags):
            self.flags = flags

        def get_input(self, i):
            return Input()

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"cache-for-this-gpu"

    class Config:
        def __init__(self):
            self.flags = {Flag.TF32}  # TensorRT's default
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.flags.discard(f)

        def add_optimization_profile(self, p):
            pass

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data == cache_from_elsewhere and not ignore_mismatch:
                return False  # TensorRT refuses a cache from another GPU or version and keeps none
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.range = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            self.network = Network(flags)
            return self.network

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.built.append((network.flags, set(config.flags)))
            return b"plan"

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    return trt


@pytest.fixture
def with_trt(monkeypatch):
    def install(version: str):
        trt = fake_tensorrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        import exporters.tensorrt_export as te

        monkeypatch.setattr(te, "gpu_identity", lambda: {"name": "Fake GPU", "compute_capability": "9.0"})
        return trt, te

    return install


@pytest.mark.parametrize("version,strong_flag", [("10.8.0", False), ("10.12.0", True), ("11.4.0", False)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_flags_per_version(with_trt, tmp_path, version, strong_flag, precision):
    trt, te = with_trt(version)
    info = te.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision=precision, shape=(3, 16, 16))
    creation, flags = trt.built[-1]
    assert bool(creation) == strong_flag  # 10.12+ asks for strong typing; 11 has no such flag; 10.8 cannot
    assert (trt.BuilderFlag.TF32 in flags) == (precision != "fp32")  # fp32 engines must not round to TF32
    assert (trt.BuilderFlag.FP16 in flags) == (precision == "fp16" and version == "10.8.0")  # weakly typed only
    assert info["strongly_typed"] == (version != "10.8.0")


def test_timing_cache_from_another_gpu_is_replaced(with_trt, tmp_path):
    trt, te = with_trt("10.12.0")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"other-gpu")
    info = te.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp32", shape=(3, 16, 16), timing_cache=cache)
    assert "another GPU" in info["timing_cache_note"] and cache.read_bytes() == b"cache-for-this-gpu"
    info = te.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp32", shape=(3, 16, 16), timing_cache=cache)
    assert info["timing_cache_note"] == "reused"


def test_tensorrt_latency_table_builds_a_static_fp32_engine_per_entry(with_trt, monkeypatch, tmp_path):
    """`--latency-backend tensorrt`: each table entry is our one-node ONNX graph, parsed and built by
    TensorRT for the exact batch in fp32 (TF32 off), timed by the engine runner, minus the Identity overhead.
    The fake parser times a graph by its weight count, so width must show in the entries."""
    import onnx

    trt, _ = with_trt("10.12.0")
    graphs = []

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            graphs.append(onnx.load(path))
            return True

    trt.OnnxParser = Parser

    class FakeRunner:  # the engine runner, whose own clock answers the timer
        def __init__(self, plan, batch):
            g = graphs[-1].graph
            self.batch = batch
            self.shape = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
            self.ms = 0.01 + 1e-6 * sum(int(torch.tensor(list(w.dims)).prod()) for w in g.initializer)

        def time_once(self):
            return self.ms

    import profilers.runners as runners
    from profilers import sysinfo
    from profilers.layer_latency import LayerLatency, OpShape

    monkeypatch.setattr(runners, "TrtRunner", FakeRunner)
    monkeypatch.setattr(sysinfo, "describe", lambda: {"cpu": {"model": "cpu", "usable_cpus": 2}, "gpu": {"name": "Fake GPU"},
                                                      "versions": {"tensorrt": trt.__version__}})
    with pytest.raises(UserError, match="latency_device` cuda"):
        LayerLatency("tensorrt", "cpu", 8)
    table = LayerLatency("tensorrt", "cuda", 8, cache_dir=tmp_path)
    key = table.register(OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (16, 16), True))
    narrow, wide = table(key, 8, 8), table(key, 8, 64)
    assert narrow == pytest.approx(1e-6 * (8 * 8 * 9 + 8)) and wide == pytest.approx(1e-6 * (64 * 8 * 9 + 64))
    assert graphs[-1].graph.node[0].op_type == "Conv"
    assert [d.dim_value for d in graphs[-1].graph.input[0].type.tensor_type.shape.dim] == [8, 8, 16, 16]
    _, flags = trt.built[-1]
    assert trt.BuilderFlag.TF32 not in flags  # fp32 entries, as the whole-model check
    table.save()
    assert list(tmp_path.glob("latency-tensorrt-cuda-b8-*.json"))


def test_tensorrt_latency_backend_without_a_gpu_says_so():
    import importlib.util

    from profilers.layer_latency import LayerLatency

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here: the real path runs")

    with pytest.raises(NotAvailable):
        LayerLatency("tensorrt", "cuda", 1)


class FakeEngine:
    """An engine built with an optimization profile for batch 1..8; TensorRT 11 has no device_memory_size."""

    def __init__(self, v11: bool):
        if not v11:
            self.device_memory_size = 999
        self.device_memory_size_v2 = 1234

    def get_tensor_profile_shape(self, name, index):
        return [(1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16)]


class FakeContext:
    def set_input_shape(self, name, shape):
        return 1 <= shape[0] <= 8


def test_batch_outside_the_profile_is_one_line():
    from exporters.tensorrt_export import set_batch

    set_batch(FakeEngine(True), FakeContext(), "input", (8, 3, 16, 16))
    with pytest.raises(UserError, match=r"batch 32 is outside the engine's optimization profile \(batch 1 to 8\)"):
        set_batch(FakeEngine(True), FakeContext(), "input", (32, 3, 16, 16))


@pytest.mark.parametrize("v11", [False, True])
def test_device_memory_on_tensorrt_10_and_11(v11):
    from exporters.tensorrt_export import device_memory_bytes

    assert device_memory_bytes(FakeEngine(v11)) == 1234


def test_tensorrt_that_fails_to_load_does_not_stop_cpu_profiles(monkeypatch):
    """The PyPI stub or missing CUDA libraries raise something other than ImportError."""
    from profilers import sysinfo

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise OSError("libnvinfer.so.10: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "tensorrt", Broken("tensorrt"))
    assert sysinfo.versions()["tensorrt"] is None


# ----------------------------------------------------------------------------- ONNX Runtime provider fallback
def test_ort_session_that_fell_back_to_cpu_is_refused(monkeypatch, cnn_parent, tmp_path):
    import onnxruntime as ort

    import exporters.onnx_export as oe
    from profilers.runners import OrtRunner

    class FellBack:
        def get_providers(self):
            return ["CPUExecutionProvider"]  # asked for CUDA; its libraries did not load

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(oe, "ort_session", lambda *a, **k: FellBack())
    with pytest.raises(NotAvailable, match="fell back to CPUExecutionProvider"):
        OrtRunner(tmp_path / "m.onnx", 1, device="cuda")


# ----------------------------------------------------------------------------- NVML
class Nvml:
    """pynvml at the boundary: energy in mJ, and the clock-event queries old drivers do not have."""

    class NVMLError(Exception):
        pass

    def __init__(self, reasons_raise: bool = False, violations: bool = False):
        self.mj, self.reasons, self.violation_ns = 1_000_000, 0, 0
        self.reasons_raise, self.violations = reasons_raise, violations
        self.asked = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        self.asked.append(("index", i))
        return ("gpu", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked.append(("uuid", uuid))
        return ("gpu", uuid)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.mj

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        if self.reasons_raise:
            raise self.NVMLError("Function Not Found")  # drivers before R535
        return self.reasons

    def nvmlDeviceGetViolationStatus(self, h, policy):
        if not self.violations:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(violationTime=self.violation_ns)


def test_clock_event_query_that_raises_does_not_end_the_profile():
    nv = Nvml(reasons_raise=True)
    c, why = energy.nvml_counter(0, nv)
    assert why is None
    res = energy.measure(c, lambda: setattr(nv, "mj", nv.mj + 1000), batch=1, window_s=0.02, idle_s=0.0, settle_s=0.0)
    assert res.joules_per_inference == pytest.approx(1.0) and res.throttled is None  # unknown, not an error


def test_throttling_counts_the_whole_window_and_only_real_reasons():
    nv = Nvml(violations=True)
    c, _ = energy.nvml_counter(0, nv)

    def throttled_briefly():  # power-capped for 5 ms somewhere inside the window, not at its edges
        nv.violation_ns += 5_000_000 if nv.violation_ns == 0 else 0

    assert energy.measure(c, throttled_briefly, 1, window_s=0.02, idle_s=0.0, settle_s=0.0).throttled is True
    nv2 = Nvml()
    c2, _ = energy.nvml_counter(0, nv2)
    nv2.reasons = 0x1 | 0x2 | 0x10  # idle, application clocks, sync boost: not throttling
    assert energy.measure(c2, lambda: None, 1, window_s=0.01, idle_s=0.0, settle_s=0.0).throttled is False
    nv2.reasons = 0x40  # HW thermal slowdown
    assert energy.measure(c2, lambda: None, 1, window_s=0.01, idle_s=0.0, settle_s=0.0).throttled is True


def test_nvml_device_follows_cuda_visible_devices(monkeypatch):
    """torch's cuda:0 is NVML's GPU 2 when CUDA_VISIBLE_DEVICES=2,3 (NVML ignores that variable)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: (_ for _ in ()).throw(RuntimeError("no CUDA")))
    nv = Nvml()
    energy.nvml_counter(0, nv)
    assert nv.asked == [("index", 2)]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="1f2e-aa"))
    nv = Nvml()
    energy.nvml_counter(0, nv)
    assert nv.asked == [("uuid", "GPU-1f2e-aa")]


# ----------------------------------------------------------------------------- Jetson sysfs trees
def _rails(root: Path, bus: str, rails: dict[str, tuple[int, int]]) -> None:
    h = root / bus / "hwmon" / "hwmon1"
    h.mkdir(parents=True)
    for i, (label, (mv, ma)) in enumerate(rails.items(), 1):
        (h / f"in{i}_label").write_text(label + "\n")
        (h / f"in{i}_input").write_text(str(mv))
        (h / f"curr{i}_input").write_text(str(ma))


def test_orin_nx_uses_its_module_input_rail(tmp_path):
    _rails(tmp_path, "1-0040", {"VDD_IN": (5000, 2000), "VDD_CPU_GPU_CV": (5000, 1000), "VDD_SOC": (5000, 500)})
    c, why = energy.jetson_counter(str(tmp_path))
    assert why is None and c.power_w() == pytest.approx(10.0) and "VDD_IN" in c.scope


def test_agx_orin_sums_its_rails(tmp_path):
    """AGX Orin has no VDD_IN: its module power is VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0."""
    _rails(tmp_path, "1-0040", {"VDD_GPU_SOC": (5000, 1000), "VDD_CPU_CV": (5000, 400), "VIN_SYS_5V0": (5000, 600)})
    _rails(tmp_path, "1-0041", {"NC": (0, 0), "VDDQ_VDD2_1V8AO": (1800, 100)})
    c, why = energy.jetson_counter(str(tmp_path))
    assert why is None and c.power_w() == pytest.approx(10.0) and "AGX Orin" in c.scope


def test_jetson_sampler_runs_only_inside_the_energy_window(tmp_path):
    _rails(tmp_path, "1-0040", {"VDD_IN": (5000, 2000)})
    c, _ = energy.jetson_counter(str(tmp_path))
    assert c._thread is None  # created by the profile, idle during latency timing
    seen = []
    energy.measure(c, lambda: seen.append(c._thread is not None), 1, window_s=0.02, idle_s=0.0, settle_s=0.0)
    assert all(seen) and seen and c._thread is None


def test_rapl_skips_the_platform_zone(tmp_path):
    for zone, name, uj in (("intel-rapl:0", "package-0", 1000), ("intel-rapl:1", "psys", 5000)):
        d = tmp_path / zone
        d.mkdir()
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(str(uj))
        (d / "max_energy_range_uj").write_text("262143328850")
    c, why = energy.rapl_counter(str(tmp_path))
    assert why is None and [d.name for d in c.domains] == ["intel-rapl:0"]
