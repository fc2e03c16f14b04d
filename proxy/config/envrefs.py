"""Environment references in the policy's string values: ``${NAME}``, ``${NAME:-default}``, ``$$``.

Expanded by the loader (proxy/config/loader.py) while it reads the YAML, so a
problem is reported at the value's line and column. ``$`` followed by anything
but ``{`` or ``$`` is kept as written (regular expressions end in ``$``).
``${NAME:-default}`` takes the default when NAME is unset or empty, as the
shell does; the default is text up to the closing brace (no nesting).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Expansion", "expand", "is_secret_name"]

_REFERENCE = re.compile(r"\$(?:\$|\{([^}]*)\}|\{)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(slots=True)
class Expansion:
    """The result of expanding one string value."""

    text: str
    used: dict[str, str] = field(default_factory=dict)  # variables read, with the value each gave
    missing: list[str] = field(default_factory=list)  # unset variables without a default
    error: str | None = None  # a malformed reference (the value is unusable)


def expand(text: str, environ: Mapping[str, str]) -> Expansion:
    """Expand every reference in ``text``; an unset variable without default expands to nothing."""
    if "$" not in text:
        return Expansion(text)
    result = Expansion("")
    out: list[str] = []
    last = 0
    for found in _REFERENCE.finditer(text):
        out.append(text[last : found.start()])
        last = found.end()
        whole = found.group(0)
        if whole == "$$":
            out.append("$")
            continue
        body = found.group(1)
        if body is None:  # "${" with no closing brace
            result.error = 'an environment reference "${" is not closed by "}" (write $$ for a literal $)'
            return result
        name, sep, default = body.partition(":-")
        if not _NAME.fullmatch(name):
            result.error = (
                f'"${{{body}}}" is not an environment reference: write ${{NAME}} or ${{NAME:-default}} '
                "(letters, digits and _), or $$ for a literal $"
            )
            return result
        value = environ.get(name)
        if value:
            out.append(value)
            result.used[name] = value
        elif sep:
            out.append(default)
        elif value is not None:  # set but empty, no default: the empty string, as the shell does
            result.used[name] = value
        else:
            result.missing.append(name)
    out.append(text[last:])
    result.text = "".join(out)
    return result


# Key and variable names whose values are secrets: the admin output shows them as ***.
_SECRET_WORDS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "secret_key",
    "access_key",
    "private_key",
    "authorization",
    "credential",
    "credentials",
    "cookie",
)


def is_secret_name(name: str) -> bool:
    """``password``, ``X-Api-Key``, ``REDIS_PASSWORD``, ``auth_token``: names that hold secrets.

    A name is secret when it is one of the words or ends with ``_word`` (``-`` counts as ``_``);
    ``token_env`` and ``token_file`` (the name of a variable, a path) are not.
    """
    normalized = name.lower().replace("-", "_")
    return any(normalized == word or normalized.endswith("_" + word) for word in _SECRET_WORDS)
