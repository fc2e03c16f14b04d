"""The ``tracing:`` policy section: where spans go and how many requests are sampled.

Imports only ``proxy.options.base`` and ``proxy.options.units`` (the models import this module).
"""

from __future__ import annotations

import os
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from proxy.options.base import Count, PolicyModel, Text
from proxy.options.units import Percent, policy_error

__all__ = ["TracingOptions", "resolve_headers"]

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONTROL = re.compile(r"[\r\n\0]")


class TracingOptions(PolicyModel):
    """Distributed tracing: W3C Trace Context through Fender, spans exported over OTLP/HTTP (protobuf)."""

    otlp_endpoint: Text = Field(
        description=(
            "Base URL of an OpenTelemetry collector's OTLP/HTTP receiver (default port 4318), e.g. "
            "http://127.0.0.1:4318; spans are POSTed to its /v1/traces as protobuf. A URL whose path "
            "already ends in /v1/traces is used as it is."
        ),
    )
    sample: Percent = Field(
        default="1%",
        validate_default=True,
        description=(
            "Head sampling for requests that arrive without a trace parent: this share of them starts a "
            "sampled trace. A request with a traceparent follows its sampled flag (parent-based sampling)."
        ),
    )
    service_name: Text = Field(
        default="fender",
        min_length=1,
        description="The service.name resource attribute of Fender's spans.",
    )
    headers: dict[Text, Text] = Field(
        default_factory=dict,
        description=(
            "Extra HTTP headers on each export request, e.g. an API key for a hosted backend. A value may "
            "reference environment variables as ${NAME} (read when the policy loads; never logged)."
        ),
    )
    queue_size: Annotated[Count, Field(ge=1, le=1_000_000)] = Field(
        default=8192,
        description=(
            "At most this many finished spans wait for export; when the collector is slow or down, spans "
            "beyond it are dropped (fender_trace_spans_dropped_total), never holding up a request."
        ),
    )
    sample_seed: Count | None = Field(
        default=None,
        description=(
            "Seed of the random source that samples new traces, for reproducible sampling in tests; "
            "absent (the default): seeded from the operating system."
        ),
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise policy_error(f"otlp_endpoint must be an http:// or https:// URL with a host, not {value!r}")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names_and_env(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise policy_error(f"{name!r} is not a valid HTTP header name", name)
            if _CONTROL.search(value):
                raise policy_error(f"header {name}: the value has a control character (CR, LF, NUL)", name)
            for variable in _ENV_REFERENCE.findall(value):
                if variable not in os.environ:
                    raise policy_error(f"header {name}: environment variable {variable} is not set", name)
        return headers

    @property
    def traces_url(self) -> str:
        url = self.otlp_endpoint.rstrip("/")
        return url if url.endswith("/v1/traces") else url + "/v1/traces"


def resolve_headers(headers: dict[str, str]) -> dict[str, str]:
    """The export headers with ${NAME} replaced by the environment's values (unset: empty).

    CR, LF and NUL in an environment value are removed: they would end the header early.
    """
    return {
        name: _CONTROL.sub("", _ENV_REFERENCE.sub(lambda m: os.environ.get(m.group(1), ""), value))
        for name, value in headers.items()
    }
