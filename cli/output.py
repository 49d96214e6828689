"""Tables printed to stdout."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True, markup=False)


def fmt_int(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def before_after(title: str, before: dict, after: dict) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    for key, label in (("params", "params"), ("macs", "MACs (conv+linear)")):
        b, a = before.get(key), after.get(key)
        t.add_row(label, fmt_int(b), fmt_int(a), f"-{100 * (1 - a / b):.1f}%" if b else "-")
    for key in ("top1", "top5"):
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            delta = f"{a - b:+.2f}" if a is not None and b is not None else "-"
            t.add_row(f"{key} (%)", fmt_pct(b), fmt_pct(a), delta)
    return t


def emit(text: str) -> None:
    """Plain text (Markdown tables) to stdout: no wrapping, no markup interpretation."""
    print(text, flush=True)
