"""Outputs: what consumes the training records and the rejected records.

`metrics` updates the Prometheus metrics from sessions (an observer) and `metrics_export`
serves or pushes them; `dead_letters` and `scores` append JSON lines per worker
(`jsonl`); `figures` draws a run's PNGs.
"""
