"""What machine a measurement was taken on: CPU, GPU, clocks and throttle state where readable, versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu() -> dict:
    model = None
    mhz = []
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        if line.startswith("cpu MHz"):
            mhz.append(float(line.split(":", 1)[1]))
    cur = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    return {
        "model": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mhz_now": (int(cur) / 1000 if cur else (round(sum(mhz) / len(mhz), 1) if mhz else None)),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "thermal_throttle_count": _read("/sys/devices/system/cpu/cpu0/thermal_throttle/core_throttle_count"),
        "jetson_model": _read("/proc/device-tree/model") if Path("/etc/nv_tegra_release").exists() else None,
    }


def channel_block() -> int:
    """Channels per SIMD block of the CPU's blocked convolution layouts (nChw16c with AVX-512, nChw8c on
    other x86), 1 where unknown: OpenVINO's CPU plugin pads a conv's channels up to a whole block."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return 1
    flags = next((line for line in (_read("/proc/cpuinfo") or "").splitlines() if line.startswith("flags")), "")
    return 16 if " avx512f" in f" {flags.split(':', 1)[-1]} " else 8


def gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    info = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda}
    try:
        import pynvml as nvml

        nvml.nvmlInit()
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        info.update({
            "driver": nvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM),
            "temperature_c": nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "power_limit_w": nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
        })
    except Exception as e:  # no nvidia-ml-py or no NVML: clocks stay unknown
        info["clocks"] = f"unreadable: {type(e).__name__}"
    return info


def versions() -> dict:
    import onnxruntime

    v = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import tensorrt

        v["tensorrt"] = tensorrt.__version__
    except Exception:  # not installed, or a broken install (the PyPI stub, missing CUDA libraries): CPU profiles go on
        v["tensorrt"] = None
    from exporters.openvino_export import version

    v["openvino"] = version()
    return v


def describe() -> dict:
    return {"host": platform.node(), "os": f"{platform.system()} {platform.release()}", "cpu": cpu(), "gpu": gpu(),
            "versions": versions(), "torch_threads": torch.get_num_threads()}


def one_line(m: dict) -> str:
    g = m.get("gpu")
    dev = f", GPU {g['name']}" if g else ", no GPU"
    return f"{m['cpu']['model']} ({m['cpu']['usable_cpus']} CPUs){dev}; torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}" + (
        f", openvino {m['versions']['openvino']}" if m["versions"].get("openvino") else "")
