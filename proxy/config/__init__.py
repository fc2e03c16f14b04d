"""The policy file: models, unit types, YAML loading with located errors, JSON Schema.

Typical use::

    from proxy.config import load_policy, PolicyError

    try:
        policy = load_policy("policy.yaml")
    except PolicyError as exc:
        print(exc)          # one "FILE:LINE:COL: path: message" line per problem
"""

from proxy.config.loader import (
    PolicyError,
    PolicyIssue,
    dump_policy_yaml,
    format_path,
    load_policy,
    parse_policy,
)
from proxy.config.models import (
    ListenAddress,
    Policy,
    PolicyModel,
    PoolOptions,
    Replica,
    Route,
    RouteMatch,
    ServerOptions,
    Upstream,
    dump_policy,
)
from proxy.config.schema import policy_json_schema, schema_text
from proxy.options.units import (
    Duration,
    Percent,
    Rate,
    RateValue,
    Size,
    format_duration,
    format_percent,
    format_rate,
    format_size,
)

__all__ = [
    "Duration",
    "ListenAddress",
    "Percent",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "PolicyModel",
    "PoolOptions",
    "Rate",
    "RateValue",
    "Replica",
    "Route",
    "RouteMatch",
    "ServerOptions",
    "Size",
    "Upstream",
    "dump_policy",
    "dump_policy_yaml",
    "format_duration",
    "format_path",
    "format_percent",
    "format_rate",
    "format_size",
    "load_policy",
    "parse_policy",
    "policy_json_schema",
    "schema_text",
]
