"""The FLOPs-vs-speedup report: Markdown, CSV, JSON and PNG plots from a profile document."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from compressor import atomic

COLUMNS = ["target", "params", "MACs", "FLOPs red.", "FLOPs speedup", "measured speedup", "realised",
           "p50 ms", "p99 ms", "img/s", "RSS rise MB", "device MB", "energy mJ/img", "top-1"]


def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def table_rows(doc: dict) -> list[dict]:
    out = []
    for r in doc["results"]:
        sp = r.get("speedup") or {}
        e = r.get("energy") or {}
        if sp:
            star = "" if sp["significant"] else " (n.s.)"
            measured = f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]{star}"
        else:
            measured = "baseline" if doc.get("baseline") == r["target"] else "-"
        mj = None if e.get("joules_per_inference") is None else 1000 * e["joules_per_inference"]
        out.append({
            "backend": backend_label(r), "device": r["device"], "batch_size": r["batch_size"], "target": r["target"],
            "params": _f(r["params"], "{:,}"), "MACs": _f(r["macs"], "{:,}"),
            "FLOPs red.": _f(sp.get("flops_reduction"), "{:.1%}"), "FLOPs speedup": _f(sp.get("flops_speedup"), "{:.2f}x"),
            "measured speedup": measured, "realised": _f(sp.get("realised_fraction"), "{:.2f}"),
            "p50 ms": _f(r["latency_ms"]["p50"], "{:.3f}"), "p99 ms": _f(r["latency_ms"]["p99"], "{:.3f}"),
            "img/s": _f(r["throughput_ips"], "{:.1f}"), "RSS rise MB": _f(r["memory"]["peak_rss_delta_mb"], "{:.1f}"),
            "device MB": _f(r["memory"]["device_peak_mb"], "{:.1f}"),
            "energy mJ/img": ("{:.3f}".format(mj) + (" (estimate)" if e.get("estimate") else "")) if mj is not None else "n/a",
            "top-1": _f(r.get("top1"), "{:.2f}"),
        })
    return out


def backend_label(r: dict) -> str:
    """The backend with the precision it was pinned to, where that is a setting (OpenVINO: f32 vs bf16)."""
    return r["backend"] + (f" {r['inference_precision']}" if r.get("inference_precision") else "")


def markdown(doc: dict) -> str:
    from .sysinfo import one_line

    lines = [f"## Profile on {one_line(doc['machine'])}", ""]
    check = doc.get("machine_check") or {}
    if check and not check.get("quiet", True):
        lines += [f"**UNRELIABLE: the machine was busy while timing ({'; '.join(check['reasons'])}). Every latency, "
                  "throughput and speedup below may be distorted; measure again on a quiet machine.**", ""]
    rows = table_rows(doc)
    keys = sorted({(r["backend"], r["device"], r["batch_size"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for backend, device, batch in keys:
        lines += [f"### {backend} on {device}, batch {batch}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        for r in rows:
            if (r["backend"], r["device"], r["batch_size"]) == (backend, device, batch):
                lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
        lines.append("")
    reasons = {str(r["energy"]["reason"]) for r in doc["results"] if (r.get("energy") or {}).get("reason")}
    if reasons:
        lines += [f"Energy n/a: {'; '.join(sorted(reasons))}.", ""]
    lines += ["Speedup: median of per-round latency ratios against the baseline, interleaved rounds; "
              "[low, high] is a distribution-free confidence interval for that median; (n.s.) = the interval includes 1. "
              "Realised = measured speedup / FLOPs speedup. RSS rise = peak resident memory while the target "
              "loads and runs, above the process before it.", ""]
    if doc.get("flags"):
        lines += ["Layers with channel counts that are not multiples of 8 (often slower kernels):", ""]
        for f in doc["flags"][:20]:
            lines.append(f"- {f['target']}: {f['module']} ({f['channels']})")
        if len(doc["flags"]) > 20:
            lines.append(f"- ... and {len(doc['flags']) - 20} more")
        lines.append("")
    for b in doc.get("breakdown", []):
        lines += [f"Top operators, {b['target']} on {b['backend']} batch {b['batch_size']}:", ""]
        lines += [f"- {o['op']}: {o['ms_per_iter']:.3f} ms/iter ({o['share']:.0%})" for o in b["top_ops"]] + [""]
    for s in doc.get("skipped", []):
        lines.append(f"- skipped {s['target']} on {s['backend']}: {s['reason']}")
    return "\n".join(lines) + "\n"


def csv_text(doc: dict) -> str:
    buf = io.StringIO()
    fields = ["backend", "device", "batch_size", "target", "params", "macs", "flops_reduction", "flops_speedup",
              "speedup", "speedup_ci_low", "speedup_ci_high", "significant", "realised_fraction", "p50_ms", "p90_ms",
              "p99_ms", "mean_ms", "std_ms", "throughput_ips", "peak_rss_mb", "device_peak_mb", "file_bytes",
              "energy_j_per_inference", "energy_net_j_per_inference", "energy_source", "top1"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in doc["results"]:
        sp = r.get("speedup") or {}
        e = r.get("energy") or {}
        lat = r["latency_ms"]
        w.writerow({"backend": backend_label(r), "device": r["device"], "batch_size": r["batch_size"], "target": r["target"],
                    "params": r["params"], "macs": r["macs"], "flops_reduction": sp.get("flops_reduction"),
                    "flops_speedup": sp.get("flops_speedup"), "speedup": sp.get("median"), "speedup_ci_low": sp.get("ci_low"),
                    "speedup_ci_high": sp.get("ci_high"), "significant": sp.get("significant"),
                    "realised_fraction": sp.get("realised_fraction"), "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                    "p99_ms": lat["p99"], "mean_ms": lat["mean"], "std_ms": lat["std"], "throughput_ips": r["throughput_ips"],
                    "peak_rss_mb": r["memory"]["peak_rss_mb"], "device_peak_mb": r["memory"]["device_peak_mb"],
                    "file_bytes": r["memory"]["file_bytes"], "energy_j_per_inference": e.get("joules_per_inference"),
                    "energy_net_j_per_inference": e.get("net_joules_per_inference"), "energy_source": e.get("source"),
                    "top1": r.get("top1")})
    return buf.getvalue()


def plots(doc: dict, out_dir: Path) -> list[Path]:
    """speedup_vs_flops.png (measured vs FLOPs speedup with the ideal diagonal) and latency_vs_batch.png."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # its font-cache notes would break one-line errors

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pts = [r for r in doc["results"] if r.get("speedup") and r["speedup"].get("flops_speedup")]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if pts:
        hi = max(max(r["speedup"]["flops_speedup"], r["speedup"]["median"]) for r in pts) * 1.1
        ax.plot([1, hi], [1, hi], "k--", lw=1, label="ideal (speedup = FLOPs speedup)")
        for key in sorted({(r["backend"], r["batch_size"]) for r in pts}):
            sel = [r for r in pts if (r["backend"], r["batch_size"]) == key]
            x = [r["speedup"]["flops_speedup"] for r in sel]
            y = [r["speedup"]["median"] for r in sel]
            err = [[r["speedup"]["median"] - r["speedup"]["ci_low"] for r in sel],
                   [r["speedup"]["ci_high"] - r["speedup"]["median"] for r in sel]]
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=f"{key[0]} batch {key[1]}")
        ax.legend(fontsize=8)
    ax.set_xlabel("FLOPs speedup (baseline MACs / MACs)")
    ax.set_ylabel("measured speedup")
    ax.set_title("What the FLOPs cut bought")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / "speedup_vs_flops.png"
    _save(fig, p)
    written.append(p)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for key in sorted({(r["target"], r["backend"]) for r in doc["results"]}):
        sel = sorted([r for r in doc["results"] if (r["target"], r["backend"]) == key], key=lambda r: r["batch_size"])
        ax.plot([r["batch_size"] for r in sel], [r["latency_ms"]["p50"] for r in sel], "o-", label=f"{key[0]} ({key[1]})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency (ms)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / "latency_vs_batch.png"
    _save(fig, p)
    written.append(p)
    plt.close("all")
    return written


def _save(fig, path: Path) -> None:
    with atomic.temp_path_for(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write_all(doc: dict, out_dir: Path) -> dict[str, Path]:
    """The report directory, whole or not at all."""
    with atomic.staged_dir(out_dir) as stage:
        atomic.write_json(stage / "profile.json", doc)
        atomic.write_text(stage / "profile.md", markdown(doc))
        atomic.write_text(stage / "profile.csv", csv_text(doc))
        pngs = [out_dir / p.name for p in plots(doc, stage)]
    return {"json": out_dir / "profile.json", "md": out_dir / "profile.md", "csv": out_dir / "profile.csv",
            **{p.stem: p for p in pngs}}
