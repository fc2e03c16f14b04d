"""The admin listener: health, readiness, metrics and the admin API (Starlette)."""
