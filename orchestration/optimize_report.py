"""report.md, report.json and accuracy_vs_speedup.png of a `compress optimize` run (written whole or not at all)."""

from __future__ import annotations

from pathlib import Path

from compressor import atomic


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(doc: dict) -> str:
    s, p = doc["settings"], doc["parent"]
    if s["target_speedup"] is None:
        goal = f"{s['target_latency_ms']:g} ms"
    elif s["target_speedup"] == "max":
        goal = "the fastest speedup within the accuracy bound"
    else:
        goal = f"{s['target_speedup']:g}x"
    verdict = "PASSED: both bounds hold on the deployed artifact" if doc["passed"] else (
        f"FAILED: the {doc['failed']['bound']} bound does not hold" + (f" ({doc['failed']['why']})" if doc["failed"].get("why") else ""))
    lines = [f"# compress optimize: {goal} on {s['runtime']} {s['device']}, batch {s['batch']}, {s['precision']} "
             f"(baseline {s['baseline_precision']}), at most {s['max_accuracy_drop']:g} point(s) of top-1", "",
             f"**{verdict}.** Speed bound: {doc['speed_band']}; accuracy bound: the deployed artifact's top-1, run in "
             f"{s['runtime']}, at most {s['max_accuracy_drop']:g} point(s) below the parent artifact's.", "",
             f"Parent: {p.get('path')} ({_f(p.get('params'), '{:,}')} params, {_f(p.get('macs'), '{:,}')} MACs); its "
             f"{s['baseline_precision']} artifact: top-1 {_f(p['accuracy']['top1'])} in {s['runtime']} on {p['accuracy']['images']} "
             f"test images (PyTorch {_f(p.get('pytorch_top1'))}).", "",
             "| attempt | pruned for | params | MACs | size (bytes) | p50 / p99 ms | speedup [95% CI] | pruning x precision | "
             "top-1 PyTorch | top-1 artifact | drop | result |", "|" + "---|" * 12]
    for a in doc["attempts"]:
        st = a.get("stages", {})
        m, acc, pr, ft, ex = st.get("measure"), st.get("accuracy"), st.get("prune", {}), st.get("finetune", {}), st.get("export", {})
        sp = "-" if m is None else f"{m['speedup']['median']:.2f}x [{m['speedup']['ci_low']:.2f}, {m['speedup']['ci_high']:.2f}]"
        split = "-" if m is None else f"{m['pruning_speedup']:.2f} x {m['precision_speedup']:.2f}"
        lat = "-" if m is None else f"{m['deployed_ms']['p50']:.4g} / {m['deployed_ms']['p99']:.4g}"
        result = "pass" if a.get("passed") else f"fail: {a.get('failed')}"
        if a.get("why"):
            result += f" ({a['why'][:120]})"
        chosen = " (chosen)" if doc.get("chosen") == a["attempt"] else ""
        lines.append(f"| {a['attempt']}{chosen} | {_f(a.get('prune_target_speedup'), '{:g}x')} | {_f(pr.get('params'), '{:,}')} | "
                     f"{_f(pr.get('macs'), '{:,}')} | {_f(ex.get('bytes'), '{:,}')} | {lat} | {sp} | {split} | {_f(ft.get('top1'))} | "
                     f"{_f(None if acc is None else acc['top1'])} | {_f(a.get('accuracy_drop'))} | {result} |")
    if doc["attempts"] and doc["attempts"][0].get("stages", {}).get("measure"):
        m = doc["attempts"][0]["stages"]["measure"]
        lines += ["", f"Parent artifact: p50 {m['parent_ms']['p50']:.4g} ms, p99 {m['parent_ms']['p99']:.4g} ms; peak RSS rise "
                      f"{_f(m['parent_memory'].get('peak_rss_delta_mb'))} MB. Energy: "
                      + (f"{m['deployed_energy']['joules_per_inference']:.4g} J per inference"
                         if m['deployed_energy'].get('joules_per_inference') is not None
                         else f"n/a ({m['deployed_energy'].get('reason')})") + "."]
        if not m["machine_check"]["quiet"]:
            lines += ["", f"**UNRELIABLE: the machine was busy while timing ({'; '.join(m['machine_check']['reasons'])}).**"]
    slower = [a for a in doc["attempts"] if (a.get("stages", {}).get("measure") or {}).get("precision_speedup", 1.0) < 0.95]
    if slower:
        m = slower[0]["stages"]["measure"]
        lines += ["", f"Note: on this runtime the {s['precision']} artifact ran slower than the same child in "
                      f"{s['baseline_precision']} (precision share {m['precision_speedup']:.2f}x in attempt {slower[0]['attempt']}): "
                      f"here {s['precision']} costs speed instead of buying it."]
    pick = next((a for a in doc["attempts"] if a["attempt"] == doc.get("chosen")), None)
    if pick is not None and pick["stages"]["prune"].get("widths"):
        w = pick["stages"]["prune"]["widths"]
        lines += ["", "Widths chosen (before -> after): " + ", ".join(f"{k} {v[0]}->{v[1]}" for k, v in list(w.items())[:40])
                  + (" ..." if len(w) > 40 else "")]
    t = doc["timings"]
    stage_s = {k: round(sum((a.get("stages", {}).get(k) or {}).get("seconds", 0) for a in doc["attempts"]), 1)
               for k in ("prune", "finetune", "export", "measure", "accuracy")}
    lines += ["", "Time per stage (s, all attempts): " + ", ".join(f"{k} {v}" for k, v in stage_s.items())
              + f"; total {t.get('total_s')} s."]
    if doc.get("bundle"):
        lines += ["", f"Bundle: {doc['bundle']['path']} ({doc['bundle']['target']}), SHA-256 {doc['bundle']['sha256']}."]
    else:
        lines += ["", "No bundle was written" + ("." if doc["passed"] else ": a bound failed.")]
    if doc["commands"]:
        lines += ["", "The same stages with the single-purpose commands:", "", "```", *doc["commands"], "```"]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = doc["parent"]["accuracy"]["top1"]
    ax.scatter([1.0], [base], marker="s", color="black", label="parent artifact")
    for a in doc["attempts"]:
        m, acc = a.get("stages", {}).get("measure"), a.get("stages", {}).get("accuracy")
        if m is None or acc is None:
            continue
        sp = m["speedup"]
        ax.errorbar([sp["median"]], [acc["top1"]], xerr=[[sp["median"] - sp["ci_low"]], [sp["ci_high"] - sp["median"]]],
                    fmt="o", color="tab:green" if a.get("passed") else "tab:red", capsize=3)
        ax.annotate(str(a["attempt"]), (sp["median"], acc["top1"]), textcoords="offset points", xytext=(4, 4))
    ax.axhline(base - doc["settings"]["max_accuracy_drop"], color="grey", ls="--", lw=1, label="accuracy bound")
    ts = doc["settings"]["target_speedup"]
    if isinstance(ts, (int, float)):
        ax.axvline(0.9 * ts, color="grey", ls=":", lw=1, label="speed bound (0.9 x target)")
    ax.set_xlabel("measured speedup of the deployed artifact (95% CI)")
    ax.set_ylabel("top-1 of the deployed artifact (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(doc: dict, out: Path) -> None:
    """report.json, report.md, accuracy_vs_speedup.png next to the stages (each atomically)."""
    atomic.write_json(out / "report.json", doc)
    atomic.write_text(out / "report.md", markdown(doc))
    with atomic.temp_path_for(out / "accuracy_vs_speedup.png") as tmp:
        plot(doc, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").replace(tmp)
