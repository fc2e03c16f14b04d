"""One module per resilience policy, each with the same shape.

1. an options model (``proxy.config.base.PolicyModel``) that is the route's
   YAML section, with a description on every field;
2. a runtime object built once per route (or per upstream) from the options,
   owning the state and taking the injected clock;
3. ``build_layer(route, next_handler, ctx)``: returns the handler that wraps
   ``next_handler`` for this route, or None when the route has no such
   section. The pipeline (``proxy/dataplane/pipeline.py``) calls it once per
   route at policy load.
"""
