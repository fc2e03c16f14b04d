"""Fender: a sidecar resilience proxy."""

__version__ = "0.1.0"
