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

# The policy models import the options models from these modules; loading the
# config package first means importing a policy module on its own cannot enter
# that cycle half-way (models.py -> proxy.resilience.X -> proxy.config -> models.py).
import proxy.config  # noqa: E402, F401
