"""Fender's lean HTTP/1.1 upstream client: a keep-alive pool per upstream replica."""

from .connection import UpstreamResponse
from .errors import (
    BadResponse,
    ConnectFailure,
    ConnectTimeout,
    PoolOverflow,
    RequestBodyError,
    ResetBeforeHeaders,
    ResetMidBody,
    TLSFailure,
    UpstreamError,
    UpstreamTimeout,
)
from .pool import UpstreamPool

__all__ = [
    "BadResponse",
    "ConnectFailure",
    "ConnectTimeout",
    "PoolOverflow",
    "RequestBodyError",
    "ResetBeforeHeaders",
    "ResetMidBody",
    "TLSFailure",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTimeout",
]
