"""Measurement: FLOPs/params, latency, memory, energy, reports and CI gates."""
