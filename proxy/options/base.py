"""Building blocks shared by every policy section: the base model and small field types.

Options modules of other packages (``proxy/policies/*/options.py`` and the like) import these rather
than ``proxy.config.models``, so the models can import those sections without
an import cycle.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    Strict,
    WithJsonSchema,
)

from proxy.options.units import describe_value, policy_error

__all__ = [
    "PolicyModel",
    "Name",
    "Count",
    "Flag",
    "Text",
    "HeaderName",
    "IpNetwork",
    "NAME_PATTERN",
    "keep_ordered",
]


class PolicyModel(BaseModel):
    """Base of every policy section: unknown keys refused, immutable, defaults validated.

    Defaults may therefore be written in policy notation (``default="15s"``),
    which is also what the JSON Schema shows.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def keep_ordered(
    model: PolicyModel, low: str, high: str, message: str, at: str, raise_high: bool = True
) -> None:
    """Keep ``model.low <= model.high`` where one bounds the other (a timeout within an interval...).

    A default gives way to what the user wrote: when only one of the two was written and the
    other's default contradicts it, the default takes the written value (``health_check:
    {interval: 500ms}`` gets a 500ms timeout instead of an error about a key nobody wrote). Only
    two written values can conflict; then ``message`` is raised at the field ``at``.
    ``raise_high=False`` is for memory bounds: a written ``low`` above the default ``high`` is then
    an error too (``max_request_line: 64KiB`` never silently grows ``max_header_bytes``), while a
    written ``high`` below the default ``low`` still lowers it. Call it from an ``after`` model
    validator (it writes the derived default through the frozen model once).
    """
    low_value, high_value = getattr(model, low), getattr(model, high)
    if low_value is None or high_value is None or low_value <= high_value:
        return
    written = model.model_fields_set
    if low not in written:
        object.__setattr__(model, low, high_value)
    elif high not in written and raise_high:
        object.__setattr__(model, high, low_value)
    else:
        raise policy_error(message, at)


# --------------------------------------------------------------------------- small types

NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"
_NAME_RE = re.compile(r"[a-zA-Z0-9_.-]{1,64}")


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        if not value:
            raise policy_error('a name cannot be empty (use 1 to 64 letters, digits, "_", "." or "-")')
        raise policy_error(
            f'{describe_value(value)} is not a valid name (use 1 to 64 letters, digits, "_", "." or "-")'
        )
    return value


Name = Annotated[
    str,
    Strict(),
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": NAME_PATTERN}),
]
"""A route or upstream name: 1 to 64 of ``a-zA-Z0-9_.-``."""

Count = Annotated[int, Strict()]
"""A whole number; ``"100"`` (text), ``1.0`` and ``true`` are refused."""

Flag = Annotated[bool, Strict()]
"""``true`` or ``false`` only."""

Text = Annotated[str, Strict()]
"""Text; numbers are refused rather than silently converted."""

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_header_name(value: str) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise policy_error(f"{describe_value(value)} is not a valid header name")
    return value.lower()


HeaderName = Annotated[
    str,
    Strict(),
    AfterValidator(_check_header_name),
    WithJsonSchema({"type": "string", "pattern": r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"}),
]
"""An HTTP field name (an RFC 9110 token), lowercased."""

_HOSTNAME_RE = re.compile(
    # DNS names; "_" is allowed too because container service names often use it.
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?",
)


def _valid_hostname(host: str) -> bool:
    return _HOSTNAME_RE.fullmatch(host) is not None


def _check_host(host: str, example: str) -> str:
    """Validate an IPv4 address, an IPv6 address (without brackets) or a DNS name; lower-case it."""
    if not host:
        raise ValueError(f"the host is missing (write it like {example})")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    lowered = host.lower()
    if not _valid_hostname(lowered):
        raise ValueError(f"{describe_value(host)} is not a valid host name or IP address")
    return lowered


def _parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise policy_error(f"expected a CIDR like 10.0.0.0/8 or 192.168.1.7, got {describe_value(value)}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            fixed = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise policy_error(
                f"{describe_value(value)} is not an IP network (write it like 10.0.0.0/8, fd00::/8 or 192.168.1.7)"
            ) from exc
        raise policy_error(f"{describe_value(value)} has host bits set (did you mean {fixed}?)") from exc


IpNetwork = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    PlainValidator(_parse_network),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["10.0.0.0/8", "fd00::/8", "192.168.1.7"]}),
]
"""An IP network in CIDR notation; a bare address means a single host (/32 or /128)."""


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (or localhost)? A host name other than localhost is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_host_port(value: str, hint: str) -> str:
    """A Host value, ``name``, ``name:port``, ``1.2.3.4[:port]`` or ``[v6][:port]``, lowercased;
    refused with ``hint`` (how to write it) in the message. Used by rewrite_host and probe hosts."""
    port: str | None
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise policy_error(f"{describe_value(value)} is not a host ({hint})") from None
        if not sep or (rest and not rest.startswith(":")):
            raise policy_error(f"{describe_value(value)} is not a host ({hint})")
        port = rest[1:] if rest else None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = value, None
        try:
            _check_host(host, "app.internal")
        except ValueError as exc:
            raise policy_error(f"{exc} ({hint})") from None
    if port is not None and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise policy_error(f"{describe_value(value)}: the port must be a number from 1 to 65535")
    return value.lower()
