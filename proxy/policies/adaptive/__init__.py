"""Adaptive concurrency: a per-route limit that follows the upstream's latency (see limit.py)."""
