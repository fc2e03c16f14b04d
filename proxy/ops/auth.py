"""The admin bearer token: where it comes from, and when it is required."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from proxy.ops.preflight import StartupError

_MAX_TOKEN_FILE = 64 * 1024


class AdminAuthError(StartupError):
    """The admin token cannot be had (the message says what to change; ``at`` where it is configured)."""


def resolve_admin_token(policy, environ: Mapping[str, str] | None = None) -> str | None:
    """The token /admin/* requires, or None (the policy has no admin_auth: its admin listener is loopback).

    Raises :class:`AdminAuthError` when the token cannot be had on this machine.
    """
    environ = os.environ if environ is None else environ
    auth = policy.admin_auth
    token: str | None = None
    if auth is not None:
        if auth.token_env is not None:
            token = environ.get(auth.token_env, "").strip()
            if not token:
                raise AdminAuthError(
                    f"admin_auth.token_env names {auth.token_env}, but that environment variable is unset or "
                    "empty (set it to the token)",
                    ("admin_auth", "token_env"),
                )
        else:
            try:
                with open(auth.token_file, encoding="utf-8") as handle:
                    token = handle.read(_MAX_TOKEN_FILE).strip()  # bounded: a wrong path may be /dev/zero
            except OSError as exc:
                raise AdminAuthError(
                    f"admin_auth.token_file {auth.token_file}: cannot read it ({_reason(exc)})",
                    ("admin_auth", "token_file"),
                ) from None
            except UnicodeDecodeError:
                raise AdminAuthError(
                    f"admin_auth.token_file {auth.token_file} is not UTF-8 text", ("admin_auth", "token_file")
                ) from None
            if not token:
                raise AdminAuthError(
                    f"admin_auth.token_file {auth.token_file} is empty (write the token into it)",
                    ("admin_auth", "token_file"),
                )
        if len(token) < 16:
            where = "token_env" if auth.token_env is not None else "token_file"
            raise AdminAuthError(
                "the admin token is shorter than 16 characters; use a long random value",
                ("admin_auth", where),
            )
    # A policy without admin_auth has a loopback admin listener: the policy validation refuses the
    # rest (proxy/config/models.py, Policy._cross_checks), for `fender validate` and `run` alike.
    return token


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


# Why a request to /admin/* was refused: the three cases a client fixes differently. None of them
# says anything about the token itself (its length, a matching prefix), only what was sent.
MISSING_TOKEN = "admin token required: send Authorization: Bearer <token>"
NOT_BEARER = "the Authorization header is not a bearer token: send Authorization: Bearer <token>"
WRONG_TOKEN = "admin token not accepted: the bearer token sent is not the configured admin token"


def token_problem(header: str | None, token: str) -> str | None:
    """None when ``Authorization: Bearer <token>`` carries the token (compared in constant time),
    else which of MISSING_TOKEN, NOT_BEARER, WRONG_TOKEN applies."""
    if not header or not header.strip():
        return MISSING_TOKEN
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return NOT_BEARER
    if not value.strip():
        return MISSING_TOKEN
    if hmac.compare_digest(value.strip().encode(), token.encode()):
        return None
    return WRONG_TOKEN
