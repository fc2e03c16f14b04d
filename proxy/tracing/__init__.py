"""Distributed tracing: W3C Trace Context, lean spans, OTLP/HTTP export (see tracer.py)."""
