"""The data path: a raw ASGI application, the router and the per-route pipeline."""
