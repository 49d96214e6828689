"""Energy per inference from real counters, or `null` with the reason.

Counters: NVIDIA GPUs through NVML's total-energy counter; Jetson modules by integrating the module-input
rail (VDD_IN) of the INA3221 monitors in sysfs, which excludes the carrier board; Intel/AMD CPUs through
powercap (RAPL) package counters, with wrap-around. They update coarsely (NVML about every 100 ms), so
energy is taken over a window of many inferences lasting several seconds, after an idle baseline of the
same counter just before it.
"""

from __future__ import annotations

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

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- NVML
class NvmlCounter(Counter):
    source = "nvml"
    scope = "GPU board (nvmlDeviceGetTotalEnergyConsumption)"

    def __init__(self, nvml, index: int = 0):
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._events = 0
        self._last_reasons = 0

    def joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0  # mJ -> J

    def throttle_events(self) -> int | None:
        get = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(self.nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if get is None:
            return None
        # Everything but "GPU idle" and "application clocks setting" means the clocks were held down.
        reasons = int(get(self.handle)) & ~0x1 & ~0x2
        if reasons:
            self._events += 1
        return self._events


def nvml_counter(index: int = 0, nvml=None) -> tuple[Counter | None, str | None]:
    try:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        nvml.nvmlInit()
        c = NvmlCounter(nvml, index)
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


def rapl_counter(root: str = "/sys/class/powercap") -> tuple[Counter | None, str | None]:
    base = Path(root)
    if not base.is_dir():
        return None, f"no RAPL counters ({root} does not exist: virtual machine or non-x86 CPU)"
    domains = sorted(Path(p) for p in glob.glob(str(base / "intel-rapl:*")) if p.count(":") == 1)
    if not domains:
        return None, f"no RAPL package domain under {root}"
    try:
        return RaplCounter(domains), None
    except PermissionError as e:
        return None, f"RAPL counters are root-only here ({e.filename}: permission denied)"
    except (OSError, ValueError) as e:
        return None, f"cannot read RAPL counters: {e}"


# ----------------------------------------------------------------------------- Jetson INA3221
def find_jetson_rail(root: str = "/sys/bus/i2c/drivers/ina3221", label: str = "VDD_IN") -> tuple[Path, str] | None:
    """(hwmon directory, channel number) of the rail whose label is `label`."""
    for lab in sorted(glob.glob(f"{root}/*/hwmon/hwmon*/in*_label")):
        p = Path(lab)
        try:
            if p.read_text().strip() == label:
                return p.parent, p.name[2:].split("_")[0]
        except OSError:
            continue
    return None


class JetsonRailCounter(Counter):
    source = "jetson-ina3221"
    scope = "module input rail VDD_IN (excludes the carrier board)"

    def __init__(self, hwmon: Path, channel: str, period_s: float = 0.01, clock: Callable[[], float] = time.monotonic):
        self.volt = hwmon / f"in{channel}_input"  # mV
        self.curr = hwmon / f"curr{channel}_input"  # mA
        self.period, self.clock = period_s, clock
        self.energy = 0.0
        self._last = (self.clock(), self.power_w())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def power_w(self) -> float:
        return int(self.volt.read_text()) * int(self.curr.read_text()) / 1e6

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

    def joules(self) -> float:
        self.sample()
        with self._lock:
            return self.energy

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def jetson_counter(root: str = "/sys/bus/i2c/drivers/ina3221") -> tuple[Counter | None, str | None]:
    found = find_jetson_rail(root)
    if found is None:
        return None, "not a Jetson module (no INA3221 VDD_IN rail in sysfs)"
    try:
        return JetsonRailCounter(*found), None
    except (OSError, ValueError) as e:
        return None, f"cannot read the Jetson power rail: {e}"


def detect(device: str) -> tuple[Counter | None, str]:
    """The best counter for where the model runs, or None and every reason."""
    reasons = []
    order = [jetson_counter, (lambda: nvml_counter(0)) if device == "cuda" else rapl_counter]
    for probe in order:
        c, why = probe()
        if c is not None:
            return c, ""
        reasons.append(why)
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
            idle_s: float = 2.0) -> EnergyResult:
    """Idle baseline, then inferences for at least `window_s`; energy per image, gross and net of idle."""
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
