"""Unit types for the policy file: durations, sizes, rates and percentages.

Each type is an ``Annotated`` pydantic type that can be used as a field type in
any policy model::

    class RetryOptions(PolicyModel):
        backoff: Duration = Field(default="50ms", description="...")

A value is always written with its unit in the policy file (``250ms``,
``64KiB``, ``100/s``, ``50%``); a bare number is refused with a hint, because
``timeout: 5`` is ambiguous (seconds? milliseconds?).

On the model attributes the parsed values are plain numbers (``Duration`` ->
float seconds, ``Size`` -> int bytes, ``Percent`` -> float fraction 0..1) or a
:class:`RateValue`.  ``model_dump()`` (either mode) writes them back in the
policy-file notation, so a dump can be shown as YAML and validated again.

Bounds can be added with the usual pydantic constraints, e.g.
``Annotated[Duration, Field(gt=0)]``; the bound is given in base units
(seconds, bytes, fraction).  String defaults (``default="15s"``) need
``validate_default=True``, which :class:`proxy.config.models.PolicyModel` sets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

__all__ = [
    "Duration",
    "Size",
    "Rate",
    "RateValue",
    "Percent",
    "parse_duration",
    "parse_size",
    "parse_rate",
    "parse_percent",
    "format_duration",
    "format_size",
    "format_rate",
    "format_percent",
    "policy_error",
    "describe_value",
    "DURATION_PATTERN",
    "SIZE_PATTERN",
    "RATE_PATTERN",
    "PERCENT_PATTERN",
]

# --------------------------------------------------------------------------- errors


def policy_error(message: str, *at: str | int) -> PydanticCustomError:
    """A validation error with a plain-words message.

    ``at`` optionally names a location below the value being validated (field
    names and list indexes), so a model validator can point the error at the
    offending field rather than at the whole model.  The policy loader uses it
    to report the right line and column.
    """
    ctx: dict[str, Any] = {"reason": message}
    if at:
        ctx["fender_at"] = list(at)
    return PydanticCustomError("fender_policy", "{reason}", ctx)


def describe_value(value: Any) -> str:
    """How a value from the policy file is shown in error messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) else _plain_float(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _plain_float(value: float) -> str:
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _positional(value: Decimal | Fraction) -> str:
    """A decimal number written without exponent and without trailing zeros."""
    if isinstance(value, Fraction):
        value = Decimal(value.numerator) / Decimal(value.denominator)
    text = format(value.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


_NUMBER = r"[0-9]+(?:\.[0-9]+)?"

# --------------------------------------------------------------------------- durations

_DURATION_UNITS: dict[str, Fraction] = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"
_DURATION_RE = re.compile(rf"({_NUMBER})(ms|s|m|h)")
_DURATION_HINT = "write it like 250ms, 2s or 1m"


def parse_duration(value: Any) -> float:
    """Parse ``250ms``, ``2s``, ``1.5m``, ``1h`` into float seconds."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        if seconds < 0:
            raise policy_error(f"{value} is negative; a duration must be 0s or more")
        return seconds
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise policy_error(f"expected a duration like 250ms, 2s or 1m, got {describe_value(value)}")
    if not isinstance(value, str):
        number = _plain_float(float(value)) if isinstance(value, float) else str(value)
        if value < 0:
            raise policy_error(f"{number} is not a duration (a duration is 0s or more; {_DURATION_HINT})")
        raise policy_error(
            f"{number} is a bare number, not a duration (add a unit: write {number}s or {number}ms)"
        )
    text = value
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise policy_error(f"{describe_value(value)} is not a duration ({_duration_hint(text)})")
    try:
        return float(Fraction(match.group(1)) * _DURATION_UNITS[match.group(2)])
    except OverflowError:
        raise policy_error(f"{describe_value(value)} is too long to be a duration") from None


def _duration_hint(text: str) -> str:
    if text.startswith("-"):
        return f"a duration cannot be negative; {_DURATION_HINT}"
    match = re.fullmatch(rf"({_NUMBER})\s*([A-Za-zµ]*)", text)
    if match is None:
        return _DURATION_HINT
    number, unit = match.groups()
    if unit == "":
        return f"add a unit: write {number}s or {number}ms"
    if unit in ("us", "µs", "ns"):
        return f"the smallest unit is ms; {_DURATION_HINT}"
    if unit == "d":
        return f"days are not supported; write {_positional(Fraction(number) * 24)}h"
    if unit.lower() in ("sec", "secs", "second", "seconds"):
        return f"write {number}s"
    if unit.lower() in ("min", "mins", "minute", "minutes"):
        return f"write {number}m"
    if unit.lower() in ("hr", "hrs", "hour", "hours"):
        return f"write {number}h"
    if unit.lower() in _DURATION_UNITS:
        return f"units are lower case: write {number}{unit.lower()}"
    return f"unknown unit {unit!r}; use ms, s, m or h: {_DURATION_HINT}"


def format_duration(seconds: float) -> str:
    """Write seconds back in policy notation: ``0.25`` -> ``250ms``, ``90`` -> ``90s``.

    ``parse_duration(format_duration(x)) == x`` holds for every value that
    ``parse_duration`` can produce.
    """
    exact = Fraction(Decimal(repr(float(seconds))))
    if exact < 0:
        raise ValueError(f"negative duration {seconds!r}")
    if exact == 0:
        return "0s"
    for unit in ("h", "m", "s"):
        count = exact / _DURATION_UNITS[unit]
        if count.denominator == 1:
            return f"{count.numerator}{unit}"
    if exact < 1:
        return _positional(exact * 1000) + "ms"
    return _positional(exact) + "s"


def _serialize_duration(seconds: float) -> str:
    return format_duration(seconds)


Duration = Annotated[
    float,
    PlainValidator(parse_duration),
    PlainSerializer(_serialize_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "examples": ["250ms", "2s", "1.5s", "1m", "1h"],
        }
    ),
]
"""A duration written with a unit (``ms``, ``s``, ``m``, ``h``); float seconds in Python."""

# --------------------------------------------------------------------------- sizes

_SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)$"
_SIZE_RE = re.compile(rf"({_NUMBER})(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)")
_SIZE_HINT = "write it like 512B, 64KiB, 1MiB or 1GiB"


def parse_size(value: Any) -> int:
    """Parse ``512B``, ``64KiB``, ``1.5MiB``, ``1GB`` into int bytes."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise policy_error(f"expected a size like 512B, 64KiB or 1MiB, got {describe_value(value)}")
    if not isinstance(value, str):
        number = _plain_float(float(value)) if isinstance(value, float) else str(value)
        if value < 0:
            raise policy_error(f"{number} is not a size (a size is 0B or more; {_SIZE_HINT})")
        raise policy_error(
            f"{number} is a bare number, not a size (add a unit: write {number}B or {number}KiB)"
        )
    text = value
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise policy_error(f"{describe_value(value)} is not a size ({_size_hint(text)})")
    exact = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if exact.denominator != 1:
        raise policy_error(f"{describe_value(value)} is not a whole number of bytes ({_SIZE_HINT})")
    return exact.numerator


def _size_hint(text: str) -> str:
    if text.startswith("-"):
        return f"a size cannot be negative; {_SIZE_HINT}"
    match = re.fullmatch(rf"({_NUMBER})\s*([A-Za-z]*)", text)
    if match is None:
        return _SIZE_HINT
    number, unit = match.groups()
    if unit == "":
        return f"add a unit: write {number}B or {number}KiB"
    for known in _SIZE_UNITS:
        if unit.lower() == known.lower():
            return f"units are case-sensitive: write {number}{known}"
    if unit.lower() in ("k", "m", "g", "t"):
        letter = unit.upper()
        return f"write {number}{letter}iB (powers of 1024) or {number}{letter}B (powers of 1000)"
    return f"unknown unit {unit!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB: {_SIZE_HINT}"


def format_size(size: int) -> str:
    """Write bytes back in policy notation: ``65536`` -> ``64KiB``, ``1000`` -> ``1KB``."""
    size = int(size)
    if size < 0:
        raise ValueError(f"negative size {size!r}")
    if size == 0:
        return "0B"
    for unit in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


Size = Annotated[
    int,
    PlainValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": SIZE_PATTERN,
            "examples": ["512B", "64KiB", "1MiB", "1GiB", "10MB"],
        }
    ),
]
"""A size written with a unit (``B``, ``KiB``/``MiB``/``GiB``/``TiB``, ``KB``/``MB``/``GB``/``TB``); int bytes."""

# --------------------------------------------------------------------------- rates


@dataclass(frozen=True, slots=True)
class RateValue:
    """``count`` events per ``per_seconds`` seconds, kept exact (``100/s`` -> 100 per 1.0)."""

    count: int
    per_seconds: float

    @property
    def per_second(self) -> float:
        """The rate as events per second (a float; use count/per_seconds for exact arithmetic)."""
        return self.count / self.per_seconds

    def __str__(self) -> str:
        return format_rate(self)


RATE_PATTERN = r"^[0-9]+/([0-9]+(\.[0-9]+)?)?(ms|s|m|h)$"
_RATE_RE = re.compile(rf"([0-9]+)/({_NUMBER})?(ms|s|m|h)")
_RATE_HINT = "write it like 100/s, 6000/m or 10/h"


def parse_rate(value: Any) -> RateValue:
    """Parse ``100/s``, ``6000/m``, ``10/h`` or ``5/10s`` into a :class:`RateValue`."""
    if isinstance(value, RateValue):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise policy_error(f"expected a rate like 100/s or 6000/m, got {describe_value(value)}")
    if not isinstance(value, str):
        number = _plain_float(float(value)) if isinstance(value, float) else str(value)
        raise policy_error(
            f"{number} is a bare number, not a rate (add a period: write {number}/s or {number}/m)"
        )
    text = value
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise policy_error(f"{describe_value(value)} is not a rate ({_rate_hint(text)})")
    count = int(match.group(1))
    period = Fraction(match.group(2) or 1) * _DURATION_UNITS[match.group(3)]
    if count < 1:
        raise policy_error(f"{describe_value(value)}: the count must be at least 1 ({_RATE_HINT})")
    if period <= 0:
        raise policy_error(f"{describe_value(value)}: the period must be longer than 0s ({_RATE_HINT})")
    try:
        return RateValue(count=count, per_seconds=float(period))
    except OverflowError:
        raise policy_error(f"{describe_value(value)}: the period is too long ({_RATE_HINT})") from None


def _rate_hint(text: str) -> str:
    if text.startswith("-"):
        return f"a rate cannot be negative; {_RATE_HINT}"
    match = re.fullmatch(r"([0-9.]+)\s*(?:/|per)\s*([A-Za-z]+)", text)
    if match is None:
        return _RATE_HINT
    count, unit = match.groups()
    if "." in count:
        return f"the count must be a whole number; {_RATE_HINT}"
    lowered = unit.lower()
    for word, short in (("sec", "s"), ("min", "m"), ("hour", "h"), ("hr", "h")):
        if lowered.startswith(word):
            return f"write {count}/{short}"
    if lowered in ("d", "day", "days"):
        return f"days are not supported; write {int(count)}/24h"
    return _RATE_HINT


def format_rate(rate: RateValue) -> str:
    """Write a rate back in policy notation: ``RateValue(100, 1.0)`` -> ``100/s``."""
    period = format_duration(rate.per_seconds)
    if period in ("1s", "1m", "1h"):
        period = period[1:]
    return f"{rate.count}/{period}"


Rate = Annotated[
    RateValue,
    PlainValidator(parse_rate),
    PlainSerializer(format_rate, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": RATE_PATTERN,
            "examples": ["100/s", "6000/m", "10/h", "5/10s"],
        }
    ),
]
"""A rate written as ``COUNT/PERIOD`` (``100/s``, ``6000/m``, ``5/10s``); a :class:`RateValue`."""

# --------------------------------------------------------------------------- percentages

PERCENT_PATTERN = r"^[0-9]+(\.[0-9]+)?%$"
_PERCENT_RE = re.compile(rf"({_NUMBER})%")
_PERCENT_HINT = "write it like 50% or 12.5%"


def parse_percent(value: Any) -> float:
    """Parse ``50%`` or ``12.5%`` into a fraction between 0 and 1 (``0.5``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise policy_error(f"expected a percentage like 50%, got {describe_value(value)}")
    if not isinstance(value, str):
        number = _plain_float(float(value)) if isinstance(value, float) else str(value)
        raise policy_error(
            f"{number} is a bare number, not a percentage (add a percent sign, {_PERCENT_HINT})"
        )
    text = value
    match = _PERCENT_RE.fullmatch(text)
    if match is None:
        if text.startswith("-"):
            raise policy_error(
                f"{describe_value(value)} is out of range (a percentage is between 0% and 100%)"
            )
        raise policy_error(f"{describe_value(value)} is not a percentage ({_PERCENT_HINT})")
    exact = Fraction(match.group(1)) / 100
    if exact > 1:
        raise policy_error(f"{describe_value(value)} is out of range (a percentage is between 0% and 100%)")
    return float(exact)


def format_percent(fraction: float) -> str:
    """Write a fraction back in policy notation: ``0.125`` -> ``12.5%``."""
    exact = Decimal(repr(float(fraction))) * 100
    return _positional(exact) + "%"


Percent = Annotated[
    float,
    PlainValidator(parse_percent),
    PlainSerializer(format_percent, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": PERCENT_PATTERN,
            "examples": ["50%", "12.5%", "100%"],
        }
    ),
]
"""A percentage between ``0%`` and ``100%``; a float fraction 0..1 in Python."""
