"""The top-level ``dns:`` section: which name servers, how long answers live, how much is kept."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from proxy.config.base import Count, PolicyModel, Text, keep_ordered
from proxy.config.units import Duration, describe_value, format_duration, policy_error

__all__ = ["DnsOptions", "parse_resolver"]


def parse_resolver(text: str) -> tuple[str, int]:
    """``"127.0.0.1:53"`` / ``"10.0.0.10"`` / ``"[::1]:5353"`` -> ``(address, port)``; port 53 by default.

    A name server is given by address: a name would need a name server to be found.
    """
    value = text.strip()
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{describe_value(text)} is not host:port (write it like [fd00::10]:53)")
        host, port_text = inner, rest[1:] if rest else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"{describe_value(text)}: a name server is an IP address (and an optional port), like "
            "10.96.0.10:53 or [fd00::10]:53; a host name would need a name server to be found"
        ) from None
    if port_text == "":
        if value.endswith(":"):
            raise ValueError(f"{describe_value(text)}: the port is empty")
        return address, 53
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{describe_value(text)}: the port must be a number from 1 to 65535")
    return address, int(port_text)


class DnsOptions(PolicyModel):
    """How replicas given by name are looked up (``resolve: true``, ``srv:`` and plain host names)."""

    resolvers: tuple[Text, ...] = Field(
        default=(),
        max_length=8,
        description=(
            "Name servers as IP:PORT (port 53 when left out), asked in order. Empty: the system's, "
            "that is /etc/hosts first, then the name servers, search list and ndots of /etc/resolv.conf."
        ),
        json_schema_extra={"examples": [["10.96.0.10:53"], ["127.0.0.1:5353", "[fd00::10]:53"]]},
    )
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="2s",
        description=(
            "Longest one lookup may take, all name servers and retries included; a slower lookup counts "
            "as a failure (outcome timeout) and the last good answer stays in use."
        ),
    )
    min_ttl: Annotated[Duration, Field(gt=0)] = Field(
        default="1s",
        description="Refresh a name no more often than this, even if its records say TTL 0.",
    )
    max_ttl: Annotated[Duration, Field(gt=0)] = Field(
        default="60s",
        description=(
            "Refresh a name at least this often, whatever its records' TTL says. Each refresh is also "
            "delayed by a random 0-10% so a fleet of sidecars does not query in lockstep."
        ),
    )
    max_addresses: Count = Field(
        default=64,
        ge=1,
        le=1024,
        description=(
            "Most replicas one name (a resolve entry, or one SRV name with all its targets) may give; "
            "further addresses are ignored with a warning."
        ),
    )
    max_stale: Annotated[Duration, Field(gt=0)] = Field(
        default="5m",
        description=(
            "When a name's answer turns into NXDOMAIN or an empty answer, its last good set stays in use "
            "until that set is this old; then the entry has no replicas until the name resolves again. "
            "Other failures (timeout, SERVFAIL, refused) keep the last good set for as long as they last."
        ),
    )

    @field_validator("resolvers")
    @classmethod
    def _check_resolvers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: dict[tuple[str, int], int] = {}
        for index, text in enumerate(value):
            try:
                key = parse_resolver(text)
            except ValueError as exc:
                raise policy_error(str(exc), index) from None
            if key in seen:
                raise policy_error(
                    f"{describe_value(text)} is listed twice (also resolvers[{seen[key]}])", index
                )
            seen[key] = index
        return value

    @model_validator(mode="after")
    def _ttl_bounds(self) -> DnsOptions:
        keep_ordered(
            self,
            "min_ttl",
            "max_ttl",
            f"min_ttl ({format_duration(self.min_ttl)}) cannot exceed max_ttl ({format_duration(self.max_ttl)})",
            "min_ttl",
        )
        return self

    @property
    def servers(self) -> list[tuple[str, int]]:
        return [parse_resolver(text) for text in self.resolvers]
