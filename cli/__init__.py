"""The `compress` command line (Typer)."""
