"""Fault injection (chaos drills): delays and aborts on a route, switchable through the admin API."""
