"""Energy per inference from real counters, or `null` with the reason.

Counters: NVIDIA GPUs through NVML's total-energy counter; Jetson modules by integrating the module-input
rail (VDD_IN) of the INA3221 monitors in sysfs, which excludes the carrier board; Intel/AMD CPUs through
powercap (RAPL) package counters, with wrap-around. They update coarsely (NVML about every 100 ms), so
energy is taken over a window of many inferences lasting several seconds, after an idle baseline of the
same counter just before it.
"""

from __future__ import annotations

import contextlib
import glob
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class Counter:
    """A monotonically increasing energy reading in joules."""

    source = "?"
    scope = "?"

    def joules(self) -> float:
        raise NotImplementedError

    def throttle_events(self) -> int | None:
        """A count that rises when clocks are throttled (None if unreadable)."""
        return None

    def start(self) -> None:
        """Begin sampling (counters read on demand need nothing)."""

    def stop(self) -> None:
        """End sampling started by start()."""

    def close(self) -> None:
        self.stop()


# ----------------------------------------------------------------------------- NVML
# Clock-event reasons that mean the clocks were held down (nvml.h): SW power cap, HW slowdown, SW thermal,
# HW thermal, HW power brake. "GPU idle", "application clocks", sync boost and display clocks are not throttling.
THROTTLE_REASONS = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
PERF_POLICIES = (0, 1)  # NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL


class NvmlCounter(Counter):
    source = "nvml"
    scope = "GPU board (nvmlDeviceGetTotalEnergyConsumption)"

    def __init__(self, nvml, handle):
        self.nvml = nvml
        self.handle = handle
        self._events = 0

    def joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0  # mJ -> J

    def throttle_events(self) -> int | None:
        """Cumulative power/thermal violation time (ns): it covers the whole window, not two instants.
        Drivers or boards without it: the clock-event reasons at this instant; neither readable: None."""
        with contextlib.suppress(Exception):  # NVMLError_NotSupported / FunctionNotFound, or an older nvidia-ml-py
            return sum(int(self.nvml.nvmlDeviceGetViolationStatus(self.handle, p).violationTime) for p in PERF_POLICIES)
        get = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(self.nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if get is None:
            return None
        try:
            reasons = int(get(self.handle))
        except Exception:  # raises before R535 and on unsupported boards: unknown, not fatal
            return None
        if reasons & THROTTLE_REASONS:
            self._events += 1
        return self._events


def torch_device_handle(nvml, index: int):
    """The NVML handle of torch's cuda:`index`. NVML numbers every GPU of the machine and ignores
    CUDA_VISIBLE_DEVICES, so map by UUID (torch reports it), else through CUDA_VISIBLE_DEVICES."""
    import os

    with contextlib.suppress(Exception):  # no CUDA in torch, no uuid property, or NVML does not know it
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        if visible[index].isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(visible[index]))
        return nvml.nvmlDeviceGetHandleByUUID(visible[index])
    return nvml.nvmlDeviceGetHandleByIndex(index)


def nvml_counter(index: int = 0, nvml=None) -> tuple[Counter | None, str | None]:
    """NVML energy for torch's cuda:`index`."""
    try:
        if nvml is None:
            import pynvml  # nvidia-ml-py

            nvml = pynvml
        nvml.nvmlInit()
        c = NvmlCounter(nvml, torch_device_handle(nvml, index))
        c.joules()
        return c, None
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install 'compress[nvml]')"
    except Exception as e:  # NVMLError subclasses: no driver, not supported on this GPU...
        return None, f"NVML energy counter unavailable: {e}"


# ----------------------------------------------------------------------------- RAPL
class RaplCounter(Counter):
    source = "rapl"
    scope = "CPU packages (powercap intel-rapl package domains)"

    def __init__(self, domains: list[Path]):
        self.domains = domains
        self.max = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self.last = [int((d / "energy_uj").read_text()) for d in domains]
        self.total_uj = 0

    def joules(self) -> float:
        for i, d in enumerate(self.domains):
            now = int((d / "energy_uj").read_text())
            delta = now - self.last[i]
            if delta < 0:  # the counter wrapped at max_energy_range_uj
                delta += self.max[i] + 1
            self.total_uj += delta
            self.last[i] = now
        return self.total_uj / 1e6


def _zone(domain: Path) -> str:
    try:
        return (domain / "name").read_text().strip()
    except OSError:
        return "package"  # no name file: older kernels list packages only


def rapl_counter(root: str = "/sys/class/powercap") -> tuple[Counter | None, str | None]:
    base = Path(root)
    if not base.is_dir():
        return None, f"no RAPL counters ({root} does not exist: virtual machine or non-x86 CPU)"
    # Top-level zones are packages, and on some laptops/desktops also "psys" (the whole platform, which
    # contains the packages): counting it too would double the energy.
    domains = sorted(Path(p) for p in glob.glob(str(base / "intel-rapl:*")) if p.count(":") == 1 and _zone(Path(p)).startswith("package"))
    if not domains:
        return None, f"no RAPL package domain under {root}"
    try:
        return RaplCounter(domains), None
    except PermissionError as e:
        return None, f"RAPL counters are root-only here ({e.filename}: permission denied)"
    except (OSError, ValueError) as e:
        return None, f"cannot read RAPL counters: {e}"


# ----------------------------------------------------------------------------- Jetson INA3221
# Orin NX / Nano: VDD_IN is the module's input rail. AGX Orin has no such rail: its monitors carry
# VDD_GPU_SOC, VDD_CPU_CV and VIN_SYS_5V0 (the rest of the module), whose sum is the module's power.
MODULE_INPUT = ("VDD_IN",)
AGX_ORIN_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")


def jetson_rails(root: str = "/sys/bus/i2c/drivers/ina3221") -> dict[str, tuple[Path, str]]:
    """label -> (hwmon directory, channel number) of every labelled INA3221 channel."""
    rails: dict[str, tuple[Path, str]] = {}
    for lab in sorted(glob.glob(f"{root}/*/hwmon/hwmon*/in*_label")):
        p = Path(lab)
        try:
            rails.setdefault(p.read_text().strip(), (p.parent, p.name[2:].split("_")[0]))
        except OSError:
            continue
    return rails


def find_jetson_rail(root: str = "/sys/bus/i2c/drivers/ina3221", label: str = "VDD_IN") -> tuple[Path, str] | None:
    """(hwmon directory, channel number) of the rail whose label is `label`."""
    return jetson_rails(root).get(label)


class JetsonRailCounter(Counter):
    """Power of one or more rails integrated over time by a sampling thread, which runs only between
    start() and close(), so it does not compete with latency timing."""

    source = "jetson-ina3221"
    scope = "module input rail VDD_IN (excludes the carrier board)"

    def __init__(self, hwmon: Path, channel: str, period_s: float = 0.01, clock: Callable[[], float] = time.monotonic,
                 more: list[tuple[Path, str]] | None = None, scope: str | None = None):
        self.rails = [(h / f"in{c}_input", h / f"curr{c}_input") for h, c in [(hwmon, channel), *(more or [])]]  # mV, mA
        self.period, self.clock = period_s, clock
        if scope:
            self.scope = scope
        self.energy = 0.0
        self._last = (self.clock(), self.power_w())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def power_w(self) -> float:
        return sum(int(v.read_text()) * int(c.read_text()) for v, c in self.rails) / 1e6

    def sample(self) -> None:
        """Trapezoidal integration of power over time."""
        t, p = self.clock(), self.power_w()
        with self._lock:
            t0, p0 = self._last
            self.energy += (t - t0) * (p + p0) / 2
            self._last = (t, p)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def start(self) -> None:
        if self._thread is None:
            self._last = (self.clock(), self.power_w())
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def joules(self) -> float:
        self.sample()
        with self._lock:
            return self.energy

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=1)
            self._thread = None


def jetson_counter(root: str = "/sys/bus/i2c/drivers/ina3221") -> tuple[Counter | None, str | None]:
    rails = jetson_rails(root)
    try:
        if "VDD_IN" in rails:
            return JetsonRailCounter(*rails["VDD_IN"]), None
        if all(r in rails for r in AGX_ORIN_RAILS):
            first, *more = [rails[r] for r in AGX_ORIN_RAILS]
            return JetsonRailCounter(*first, more=more, scope="sum of rails " + " + ".join(AGX_ORIN_RAILS) +
                                     " (AGX Orin has no module-input rail; excludes the carrier board)"), None
    except (OSError, ValueError) as e:
        return None, f"cannot read the Jetson power rails: {e}"
    if rails:
        return None, f"Jetson power rails {', '.join(sorted(rails))} include no module-input rail (VDD_IN) nor the AGX Orin set"
    return None, "not a Jetson module (no INA3221 power rails in sysfs)"


def detect(device: str, cuda_index: int = 0) -> tuple[Counter | None, str]:
    """The best counter for where the model runs, or None and every reason."""
    reasons = []
    order = [jetson_counter, (lambda: nvml_counter(cuda_index)) if device == "cuda" else rapl_counter]
    for probe in order:
        c, why = probe()
        if c is not None:
            return c, ""
        reasons.append(why or "unavailable")
    return None, "; ".join(reasons)


@dataclass
class EnergyResult:
    joules_per_inference: float | None
    net_joules_per_inference: float | None
    idle_watts: float | None
    window_s: float | None
    inferences: int
    source: str | None
    scope: str | None
    throttled: bool | None
    estimate: bool = False
    reason: str | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def measure(counter: Counter, run_once: Callable[[], None], batch: int, window_s: float = 5.0,
            idle_s: float = 2.0, settle_s: float = 1.0) -> EnergyResult:
    """Idle baseline, then inferences for at least `window_s`; energy per image, gross and net of idle.
    The baseline starts `settle_s` after the last work, once clocks and power have ramped down."""
    counter.start()  # sampling counters run only inside this measurement
    try:
        time.sleep(settle_s)
        e0, t0 = counter.joules(), time.perf_counter()
        time.sleep(idle_s)
        idle_w = (counter.joules() - e0) / (time.perf_counter() - t0)
        th0 = counter.throttle_events()
        n = 0
        e1, t1 = counter.joules(), time.perf_counter()
        while time.perf_counter() - t1 < window_s:
            run_once()
            n += 1
        e2, t2 = counter.joules(), time.perf_counter()
        th1 = counter.throttle_events()
        images = n * batch
        gross = (e2 - e1) / images
        net = ((e2 - e1) - idle_w * (t2 - t1)) / images
        throttled = None if th0 is None or th1 is None else th1 > th0
    finally:
        counter.stop()
    return EnergyResult(gross, net, idle_w, t2 - t1, images, counter.source, counter.scope, throttled)


def estimate(tdp_watts: float, run_once: Callable[[], None], batch: int, window_s: float = 2.0) -> EnergyResult:
    """Explicitly labelled estimate: TDP x time / images. Not a measurement."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window_s:
        run_once()
        n += 1
    dt = time.perf_counter() - t0
    per = tdp_watts * dt / (n * batch)
    return EnergyResult(per, None, None, dt, n * batch, f"estimate: {tdp_watts} W x time", "estimate (not measured)",
                        None, estimate=True)


def unavailable(reason: str) -> EnergyResult:
    return EnergyResult(None, None, None, None, 0, None, None, None, reason=reason)
