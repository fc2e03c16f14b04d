"""Secrets out of what Fender shows: the admin API, the status page, error messages.

Two rules: a URL's password (``redis://user:PASSWORD@host``) becomes ``***``,
and so does the whole value under a key named like a secret (``password``,
``token``, ``X-Api-Key``, ``*_token``...; see
:func:`proxy.config.envrefs.is_secret_name`), wherever the value came from, and
any value read from an environment variable named like a secret
(``${TENANT_TOKEN}`` under ``x-tenant``), wherever it ended up.
The loader also hides the values of environment variables that hold secrets
from its messages (proxy/config/loader.py).
"""

from __future__ import annotations

import re
from typing import Any

from proxy.config.envrefs import is_secret_name

__all__ = ["MASK", "redact", "redact_text"]

MASK = "***"

# scheme://user:password@ -- the password runs to the last "@" before the host (no "/" in it).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:)[^/\s]*(?=@)")


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ***."""
    if "://" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def redact(data: Any, secrets: frozenset[str] = frozenset(), key: str = "") -> Any:
    """A copy of JSON-like ``data`` with secrets replaced by *** (see the module docstring).

    ``secrets`` are values known to be secret (``Policy.env_secrets``): hidden wherever they appear.
    """
    if isinstance(data, dict):
        return {k: redact(v, secrets, k if isinstance(k, str) else "") for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(item, secrets, key) for item in data]
    if isinstance(data, str):
        if data and is_secret_name(key):
            return MASK
        for secret in secrets:
            if secret in data:
                data = data.replace(secret, MASK)
        return redact_text(data)
    return data
