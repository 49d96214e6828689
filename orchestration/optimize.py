"""compress optimize: one command from a trained model to a verified deployable artifact.

Each attempt runs the stages below in its own directory under OUT/attempts/, each stage a model directory
or an artifact, so `--resume` continues from the last finished one (an interrupted fine-tune from its
checkpoint):

    prune (latency-aware, on the target runtime) -> fine-tune (distilled from the parent) -> export (the
    runtime's format, in the deployed precision) -> measure the deployed artifact against the parent's
    artifact in the same runtime and baseline precision (interleaved rounds) -> accuracy of the deployed
    artifact in its runtime on the test split

The promise is judged on the deployed artifact only: the speed bound holds when the lower end of the
speedup's 95 % interval is at least 0.9 x target (faster is never a failure), the accuracy bound when the
artifact's top-1 is at most --max-accuracy-drop points below the parent artifact's. A speed miss corrects
the pruning target by what the artifact measured and tries again; `--target-speedup max` searches targets
for the fastest attempt within the accuracy bound. Then a bundle of the artifact that was measured, and
the report.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compressor import atomic
from compressor.data import Dataset
from compressor.errors import TargetNotReached, UserError
from compressor.finetune import TrainConfig
from compressor.modeldir import LoadedModel, load_model_dir, save_model_dir, write_model_files
from compressor.progress import QUIET, Reporter
from compressor.pruning import WidthConfig
from compressor.workflows import finetune
from exporters import artifacts
from exporters.bundle import build as build_bundle
from profilers.layer_latency import default_cache_dir
from profilers.session import Settings, run as run_profile
from profilers.targets import resolve as resolve_target

from .latency_prune import LatencyTarget, latency_prune

SCHEMA = "compress-optimize/1"
SPEED_BAND = 0.9  # the interval's lower end must reach 0.9 x target
PRUNE_MARGIN = 1.05  # prune for 5 % more than promised: the artifact's interval, not its median, must clear the band
RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "torch")


@dataclass
class OptimizeConfig:
    target_speedup: float | None  # None with target_latency_ms; float("inf") for "max"
    target_latency_ms: float | None
    runtime: str
    device: str
    batch: int
    precision: str
    baseline_precision: str
    max_accuracy_drop: float
    metric: str = "taylor"
    round_to: int | None = None
    min_width_fraction: float = 0.2
    depth: bool = True  # whole residual blocks are planner moves beside the widths
    latency_rounds: int = 9
    latency_iterations: int = 5
    speed_attempts: int = 3  # prune -> ... -> measure attempts, each correcting the pruning target
    max_probes: int = 4  # --target-speedup max: targets tried
    profile_rounds: int = 10
    calib_size: int = 256
    test_limit: int | None = None
    allow_busy: bool = False
    threads: int | None = None
    seed: int = 0
    cache_dir: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: bool = True

    @property
    def searching(self) -> bool:
        return self.target_speedup == float("inf")

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UserError(f"`runtime` must be one of {', '.join(RUNTIMES)}")
        if (self.target_speedup is None) == (self.target_latency_ms is None):
            raise UserError("give one of `target_speedup` (a number, or max) or `target_latency_ms`")
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise UserError(f"`target_speedup` must be above 1, or max (got {self.target_speedup})")
        if self.target_latency_ms is not None and not self.target_latency_ms > 0:
            raise UserError("`target_latency_ms` must be positive")
        if not (self.max_accuracy_drop >= 0):
            raise UserError("`max_accuracy_drop` must be >= 0 (points of top-1)")
        for name in ("precision", "baseline_precision"):
            if getattr(self, name) not in ("fp32", "fp16", "int8"):
                raise UserError(f"`{name}` must be fp32, fp16 or int8")
        if self.runtime == "torch" and (self.precision, self.baseline_precision) != ("fp32", "fp32"):
            raise UserError("the torch runtime deploys fp32 model directories; use onnxruntime, openvino or tensorrt for fp16/int8")
        if self.runtime == "openvino" and self.device not in ("cpu", "gpu", "npu"):
            raise UserError("`device` for openvino is cpu, gpu or npu")
        if self.runtime in ("onnxruntime", "torch") and self.device not in ("cpu", "cuda"):
            raise UserError(f"`device` for {self.runtime} is cpu or cuda")
        if self.runtime == "tensorrt" and self.device != "cuda":
            raise UserError("tensorrt runs on an NVIDIA GPU: `device` cuda")
        if self.batch < 1 or self.speed_attempts < 1 or self.max_probes < 1 or self.profile_rounds < 3:
            raise UserError("`batch`, `speed_attempts`, `max_probes` must be >= 1 and `profile_rounds` >= 3")

    def latency_target(self, speedup: float | None) -> LatencyTarget:
        return LatencyTarget(speedup, None if speedup is not None else self.target_latency_ms, self.runtime, self.device, self.batch,
                             self.threads, self.cache_dir or default_cache_dir(), self.latency_rounds, self.latency_iterations,
                             self.min_width_fraction, self.allow_busy, self.depth)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("train", "cache_dir")}  # the cache changes no result
        d["target_speedup"] = "max" if self.searching else self.target_speedup
        d["train"] = self.train.to_json()
        return d


def _stage(state: dict, name: str) -> dict | None:
    return state.get("stages", {}).get(name)


def _done(state_path: Path, state: dict, name: str, info: dict) -> None:
    state.setdefault("stages", {})[name] = info
    atomic.write_json(state_path, state)


class Optimizer:
    """One optimize run: its parent, data, settings, output directory and the attempts made so far."""

    def __init__(self, parent: LoadedModel, ds: Dataset, cfg: OptimizeConfig, out: Path, device, reporter: Reporter = QUIET):
        self.parent, self.ds, self.cfg, self.out, self.device, self.rep = parent, ds, cfg, out, device, reporter
        self.attempts: list[dict] = []
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ the parent's artifact (once)
    def parent_artifact(self) -> dict:
        d = self.out / "parent"
        state_path = d / "state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if not (d / "model.json").is_file():
            save_model_dir(d, self.parent.model, self.parent.record.child())
        lm = load_model_dir(d)
        info = _stage(state, "artifact")
        if info is None:
            self.rep.log(f"parent: export for {self.cfg.runtime} in {self.cfg.baseline_precision}")
            t0 = time.perf_counter()
            path = artifacts.write(lm, self.cfg.runtime, self.cfg.baseline_precision, d / f"artifact-{self.cfg.baseline_precision}")
            acc = artifacts.top1(path, self.cfg.runtime, lm, self.ds, self.cfg.test_limit)
            info = {"path": str(path), "accuracy": acc, "pytorch_top1": lm.record.metrics.get("top1"),
                    "seconds": round(time.perf_counter() - t0, 2)}
            _done(state_path, state, "artifact", info)
        self.parent_info = info
        return info

    # ------------------------------------------------------------------ one attempt
    def attempt(self, index: int, prune_speedup: float | None, goal_speedup: float | None) -> dict:
        """prune -> fine-tune -> export -> measure -> accuracy, each stage skipped when already finished."""
        cfg = self.cfg
        tag = f"{index:02d}-" + (f"x{prune_speedup:.3g}" if prune_speedup is not None else f"{cfg.target_latency_ms:g}ms")
        d = self.out / "attempts" / tag
        d.mkdir(parents=True, exist_ok=True)
        state_path = d / "state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        row: dict[str, Any] = {"attempt": index, "dir": str(d.relative_to(self.out)), "prune_target_speedup": prune_speedup,
                               "goal_speedup": goal_speedup, "stages": {}}
        self.attempts.append(row)
        # prune
        info = _stage(state, "prune")
        if info is None:
            self.rep.log(f"attempt {index}: latency-aware prune for {tag.split('-', 1)[1]} on {cfg.runtime} {cfg.device}, batch {cfg.batch}")
            t0 = time.perf_counter()
            wcfg = WidthConfig(metric=cfg.metric, round_to=cfg.round_to, seed=cfg.seed)
            try:
                model, rec, summary = latency_prune(self.parent, self.ds, wcfg, cfg.latency_target(prune_speedup),
                                                    cfg.calib_size, self.device, self.rep, {"optimize": str(self.out)})
            except TargetNotReached as e:
                row.update({"passed": False, "failed": "speed", "why": str(e)})
                return row
            save_model_dir(d / "pruned", model, rec)
            lat = summary.latency or {}
            info = {"seconds": round(time.perf_counter() - t0, 2), "measured_speedup": lat.get("measured_speedup"),
                    "widths": lat.get("widths"), "params": summary.after.get("params"), "macs": summary.after.get("macs"),
                    "top1": summary.after.get("top1")}
            _done(state_path, state, "prune", info)
        row["stages"]["prune"] = info
        # fine-tune (resumable from its checkpoint)
        info = _stage(state, "finetune")
        if info is None:
            self.rep.log(f"attempt {index}: fine-tune {cfg.train.epochs} epochs" + (" distilled from the parent" if cfg.distill else ""))
            t0 = time.perf_counter()
            pruned = load_model_dir(d / "pruned")
            run_dir = d / "finetuned"
            model, rec, result = finetune(pruned, self.ds, cfg.train, run_dir, (run_dir / "checkpoints").is_dir(),
                                          self.device, cfg.distill, self.rep, {"optimize": str(self.out)},
                                          teacher=self.parent.model, refuse_collapse=False)
            if result.learned_nothing:  # an accuracy failure of this attempt, reported like any other
                row.update({"passed": False, "failed": "accuracy", "why": f"fine-tuning learned nothing: {result.learned_nothing}"})
                return row
            write_model_files(run_dir, model, rec)
            info = {"seconds": round(time.perf_counter() - t0, 2), "top1": rec.metrics.get("top1"), "epochs": len(result.history),
                    "resumed_from_epoch": result.resumed_from}
            _done(state_path, state, "finetune", info)
        row["stages"]["finetune"] = info
        child = load_model_dir(d / "finetuned")
        # export: the deployed artifact, and the child in baseline precision to split the speedup
        info = _stage(state, "export")
        if info is None:
            self.rep.log(f"attempt {index}: export for {cfg.runtime} in {cfg.precision}")
            t0 = time.perf_counter()
            deployed = artifacts.write(child, cfg.runtime, cfg.precision, d / f"deploy-{cfg.precision}")
            same = cfg.precision == cfg.baseline_precision
            base = deployed if same else artifacts.write(child, cfg.runtime, cfg.baseline_precision, d / f"deploy-{cfg.baseline_precision}")
            info = {"seconds": round(time.perf_counter() - t0, 2), "artifact": str(deployed), "baseline_precision_artifact": str(base),
                    "bytes": _size(deployed)}
            _done(state_path, state, "export", info)
        row["stages"]["export"] = info
        deployed, base = Path(info["artifact"]), Path(info["baseline_precision_artifact"])
        # measure: the deployed artifact against the parent's, interleaved, in the runtime
        info = _stage(state, "measure")
        if info is None:
            self.rep.log(f"attempt {index}: measure the deployed artifact against the parent's ({cfg.profile_rounds} interleaved rounds)")
            t0 = time.perf_counter()
            info = {**self._measure(Path(self.parent_info["path"]), base, deployed, d / "profile.json"),
                    "seconds": round(time.perf_counter() - t0, 2)}
            _done(state_path, state, "measure", info)
        row["stages"]["measure"] = info
        # accuracy of the deployed artifact, in its runtime
        info = _stage(state, "accuracy")
        if info is None:
            self.rep.log(f"attempt {index}: top-1 of the deployed artifact in {cfg.runtime}")
            t0 = time.perf_counter()
            info = {**artifacts.top1(deployed, cfg.runtime, child, self.ds, cfg.test_limit), "seconds": round(time.perf_counter() - t0, 2)}
            _done(state_path, state, "accuracy", info)
        row["stages"]["accuracy"] = info
        self._judge(row)
        return row

    def _measure(self, parent_artifact: Path, base: Path, deployed: Path, json_out: Path) -> dict:
        cfg = self.cfg
        targets = [t for p in dict.fromkeys([base, deployed]) for t in resolve_target(str(p))]
        baseline = resolve_target(str(parent_artifact))[0]
        for t, label in zip(targets, ["child-" + cfg.baseline_precision, "deployed-" + cfg.precision]):
            t.name = label if len(targets) == 2 else "deployed-" + cfg.precision
        baseline.name = "parent-" + cfg.baseline_precision
        ov = cfg.runtime == "openvino"
        s = Settings(backends=(cfg.runtime,), device="cpu" if ov else cfg.device, batch_sizes=(cfg.batch,), threads=cfg.threads,
                     rounds=cfg.profile_rounds, energy=True, energy_window_s=2.0, idle_s=1.0, ov_device=cfg.device if ov else "cpu",
                     allow_busy=cfg.allow_busy)
        doc = run_profile(targets, baseline, s, self.rep).to_json()
        atomic.write_json(json_out, doc)
        rows = {r["target"]: r for r in doc["results"]}
        dep, par = rows["deployed-" + cfg.precision], rows[baseline.name]
        out = {"speedup": {k: dep["speedup"][k] for k in ("median", "ci_low", "ci_high", "significant")},
               "parent_ms": {k: par["latency_ms"][k] for k in ("p50", "p99")}, "deployed_ms": {k: dep["latency_ms"][k] for k in ("p50", "p99")},
               "parent_memory": par["memory"], "deployed_memory": dep["memory"], "parent_energy": par["energy"],
               "deployed_energy": dep["energy"], "machine_check": doc["machine_check"], "profile": str(json_out)}
        child_base = rows.get("child-" + cfg.baseline_precision)
        if child_base is not None:  # the pruning share and the precision share of the speedup
            out["pruning_speedup"] = child_base["speedup"]["median"]
            out["precision_speedup"] = dep["speedup"]["median"] / child_base["speedup"]["median"]
        else:
            out["pruning_speedup"], out["precision_speedup"] = dep["speedup"]["median"], 1.0
        return out

    def _judge(self, row: dict) -> None:
        cfg = self.cfg
        m, acc = row["stages"]["measure"], row["stages"]["accuracy"]
        drop = round(self.parent_info["accuracy"]["top1"] - acc["top1"], 3)
        row["accuracy_drop"] = drop
        goal = row["goal_speedup"]
        if goal is None:  # a latency budget: the artifact's p50 against it
            assert cfg.target_latency_ms is not None  # validate(): one of the two targets
            speed_ok = m["deployed_ms"]["p50"] <= cfg.target_latency_ms / SPEED_BAND
            row["speed_shortfall"] = None if speed_ok else round(m["deployed_ms"]["p50"] - cfg.target_latency_ms, 5)
        else:
            speed_ok = m["speedup"]["ci_low"] >= SPEED_BAND * goal
            row["speed_shortfall"] = None if speed_ok else round(SPEED_BAND * goal - m["speedup"]["ci_low"], 4)
        acc_ok = drop <= cfg.max_accuracy_drop
        busy = not m["machine_check"]["quiet"] and not cfg.allow_busy
        row["passed"] = speed_ok and acc_ok and not busy
        row["failed"] = None if row["passed"] else ("busy machine" if busy else "speed and accuracy" if not (speed_ok or acc_ok)
                                                    else "speed" if not speed_ok else "accuracy")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.parent_artifact()
        if cfg.searching:
            self._search()
        else:
            goal = cfg.target_speedup
            prune_for = None if goal is None else round(goal * PRUNE_MARGIN, 3)
            for i in range(1, cfg.speed_attempts + 1):
                row = self.attempt(i, prune_for, goal)
                # only a pure speed miss is worth more pruning: one that already lost accuracy would lose more
                if row["passed"] or row["failed"] != "speed" or "stages" not in row or "measure" not in row["stages"]:
                    break
                sp = row["stages"]["measure"]["speedup"]
                if goal is None or not sp["median"] or not sp["ci_low"]:
                    break
                # What the artifact measured corrects the pruning target: by the median's shortfall, or by the
                # interval's lower end where that is what missed the band (never less than asked before).
                prune_for = round(prune_for * min(2.0, max(goal / sp["median"], SPEED_BAND * goal / sp["ci_low"], 1.02)), 3)
        self.timings["total_s"] = round(time.perf_counter() - t0, 2)
        return self.report()

    def _search(self) -> None:
        """The fastest attempt within both bounds: targets grow by 1.5x from 1.5x while attempts pass, then
        bisect between the last pass and the first failure, within --max-probes."""
        lo: float | None = None
        hi: float | None = None
        t = 1.5
        for i in range(1, self.cfg.max_probes + 1):
            row = self.attempt(i, round(t * PRUNE_MARGIN, 3), t)
            if row.get("passed"):
                lo = t
            else:
                hi = t if hi is None else min(hi, t)
            if hi is None:
                t = round(t * 1.5, 3)
                continue
            base = lo or 1.0
            if hi / base < 1.1:
                break
            t = round((base + hi) / 2, 3)
            if t <= 1.05:
                break

    def chosen(self) -> dict | None:
        passed = [a for a in self.attempts if a.get("passed")]
        if not passed:
            return None
        return max(passed, key=lambda a: a["stages"]["measure"]["speedup"]["median"]) if self.cfg.searching else passed[-1]

    # ------------------------------------------------------------------ report and bundle
    def report(self) -> dict:
        cfg = self.cfg
        best = self.chosen()
        doc: dict[str, Any] = {
            "schema": SCHEMA, "settings": cfg.to_json(),
            "parent": {**self.parent_info, "path": str(self.parent.path) if self.parent.path else None,
                       "artifact": self.parent_info["path"], "params": self.parent.record.metrics.get("params"),
                       "macs": self.parent.record.metrics.get("macs")},
            "speed_band": f"lower end of the speedup's 95% interval >= {SPEED_BAND} x target",
            "attempts": self.attempts, "chosen": None if best is None else best["attempt"], "passed": best is not None,
            "timings": self.timings, "commands": self._commands(best), "bundle": None,
        }
        if best is None:
            last = self.attempts[-1] if self.attempts else {}
            doc["failed"] = {"bound": last.get("failed"), "accuracy_drop": last.get("accuracy_drop"),
                             "speed_shortfall": last.get("speed_shortfall"), "why": last.get("why")}
        return doc

    def bundle(self, doc: dict) -> Path | None:
        best = self.chosen()
        target = artifacts.BUNDLE_TARGET.get((self.cfg.runtime, self.cfg.device))
        if best is None or target is None:
            return None
        child = load_model_dir(self.out / best["dir"] / "finetuned")
        artifact = Path(best["stages"]["export"]["artifact"])
        if self.cfg.runtime == "tensorrt":  # the device builds its own engine from the ONNX of the same precision
            artifact = self.out / best["dir"] / "bundle-onnx" / "model.onnx"
            artifacts.write(child, "onnxruntime", self.cfg.precision, artifact.parent)
        out = self.out / "bundle.tar.gz"
        build_bundle(child, target, out, self.cfg.precision, artifact=artifact)
        doc["bundle"] = {"path": str(out), "target": target, "sha256": atomic.sha256_file(out)}
        return out

    def _commands(self, best: dict | None) -> list[str]:
        """The single-purpose commands that reproduce the chosen (or last) attempt's stages."""
        cfg = self.cfg
        a = best or (self.attempts[-1] if self.attempts else None)
        if a is None or a.get("prune_target_speedup") is None and cfg.target_latency_ms is None:
            return []
        d = self.out / a["dir"]
        goal = (f"--target-speedup {a['prune_target_speedup']}" if a.get("prune_target_speedup") is not None
                else f"--target-latency-ms {cfg.target_latency_ms}")
        q = shlex.quote
        lines = [f"compress prune --model {q(str(self.out / 'parent'))} --metric {cfg.metric} {goal} --latency-backend {cfg.runtime} "
                 f"--latency-device {cfg.device} --latency-batch {cfg.batch} --out {q(str(d / 'pruned'))}",
                 f"compress finetune {q(str(d / 'pruned'))} --epochs {cfg.train.epochs} --lr {cfg.train.lr} --optimizer {cfg.train.optimizer}"
                 + (" --distill" if cfg.distill else "") + f" --out {q(str(d / 'finetuned'))}"]
        fmt = artifacts.RUNTIME_FORMAT.get(cfg.runtime)
        if fmt is not None:
            lines.append(f"compress export {q(str(d / 'finetuned'))} --format {fmt[0]} --precision {cfg.precision} "
                         f"--out {q(str(d / f'deploy-{cfg.precision}' / fmt[1]))}")
            lines.append(f"compress export {q(str(self.out / 'parent'))} --format {fmt[0]} --precision {cfg.baseline_precision} "
                         f"--out {q(str(self.out / 'parent' / f'artifact-{cfg.baseline_precision}' / fmt[1]))}")
            deployed = d / f"deploy-{cfg.precision}" / fmt[1]
            parent_art = self.out / "parent" / f"artifact-{cfg.baseline_precision}" / fmt[1]
        else:
            deployed, parent_art = d / "finetuned", self.out / "parent"
        lines.append(f"compress profile {q(str(deployed))} --baseline {q(str(parent_art))} --backend {cfg.runtime} "
                     f"--batch-sizes {cfg.batch} --rounds {cfg.profile_rounds}")
        target = artifacts.BUNDLE_TARGET.get((cfg.runtime, cfg.device))
        if target is not None:
            lines.append(f"compress package {q(str(d / 'finetuned'))} --target {target} --precision {cfg.precision} "
                         f"--out {q(str(self.out / 'bundle.tar.gz'))}")
        return lines


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
