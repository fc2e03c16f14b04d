"""Real gRPC peers for tests: a grpcio server (generic handlers, bytes in and out, no generated code)
and the wire format of a gRPC message for hand-written HTTP requests.

The server runs grpcio's own threads (not the test's event loop); tests call it through Fender with
grpcio's client in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import struct
import threading
import time
from concurrent import futures

from tests.support.need import need_module

grpc = need_module("grpc", "pip install 'fender[test]' (grpcio)")

SERVICE = "test.Echo"


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (not compressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def unframe(data: bytes) -> list[bytes]:
    """The messages of a gRPC body."""
    out = []
    while len(data) >= 5:
        size = struct.unpack(">I", data[1:5])[0]
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out


class EchoService:
    """test.Echo: Unary, ServerStream, ClientStream and Bidi, each echoing bytes.

    A unary request ``fail:NAME`` answers the gRPC status NAME (trailers-only); ``sleep:MS`` waits
    first; every call is counted in ``calls`` and the last metadata is kept in ``metadata``.
    A server stream of ``N`` sends N messages; ``hold:N`` sends N then waits on ``release``.
    """

    def __init__(self, name: str = "a", fail_first: int = 0, fail_code: str = "UNAVAILABLE") -> None:
        self.name = name
        self.calls = 0
        self.metadata: dict[str, str] = {}
        self.time_remaining: float | None = None  # of the last call: its deadline as grpcio saw it
        self.fail_first = fail_first  # this many first unary calls fail with fail_code
        self.fail_code = fail_code
        self.release = threading.Event()
        self.streaming = threading.Event()  # set once a held server stream sent its messages
        self._lock = threading.Lock()

    def _count(self, context) -> int:
        with self._lock:
            self.calls += 1
            self.metadata = {k: v for k, v in context.invocation_metadata()}
            self.time_remaining = context.time_remaining()
            return self.calls

    def unary(self, request: bytes, context) -> bytes:
        n = self._count(context)
        if n <= self.fail_first:
            context.abort(getattr(grpc.StatusCode, self.fail_code), f"{self.name} fails call {n}")
        if request.startswith(b"fail:"):
            context.abort(getattr(grpc.StatusCode, request[5:].decode().upper()), f"{self.name} was told to")
        if request.startswith(b"sleep:"):
            ms = int(request[6:])
            end = time.monotonic() + ms / 1000
            while time.monotonic() < end and context.is_active():
                time.sleep(0.01)
        return self.name.encode() + b":" + request

    def server_stream(self, request: bytes, context):
        self._count(context)
        if request.startswith(b"hold:"):
            for i in range(int(request[5:])):
                yield b"%s:%d" % (self.name.encode(), i)
            self.streaming.set()
            self.release.wait(10)
            return
        for i in range(int(request)):
            yield b"%s:%d" % (self.name.encode(), i)

    def client_stream(self, requests, context) -> bytes:
        self._count(context)
        return self.name.encode() + b":" + b"+".join(requests)

    def bidi(self, requests, context):
        self._count(context)
        for request in requests:
            yield self.name.encode() + b":" + request


def _identity(data: bytes) -> bytes:
    return data


def _handlers(service: EchoService):
    kw = {"request_deserializer": _identity, "response_serializer": _identity}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(service.unary, **kw),
            "ServerStream": grpc.unary_stream_rpc_method_handler(service.server_stream, **kw),
            "ClientStream": grpc.stream_unary_rpc_method_handler(service.client_stream, **kw),
            "Bidi": grpc.stream_stream_rpc_method_handler(service.bidi, **kw),
        },
    )


class GrpcReplica:
    """A grpcio server on 127.0.0.1 (port from the OS) serving test.Echo and grpc.health.v1."""

    def __init__(
        self,
        service: EchoService | None = None,
        health: str | None = "SERVING",
        tls: tuple[str, str] | None = None,
    ) -> None:
        """``tls``: (cert file, key file) to serve over TLS (grpcio offers ALPN h2) instead of cleartext."""
        self.service = service or EchoService()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((_handlers(self.service),))
        self.health = None
        if health is not None:
            health_mod = need_module(
                "grpc_health.v1.health", "pip install 'fender[test]' (grpcio-health-checking)"
            )
            health_pb2 = need_module("grpc_health.v1.health_pb2", "pip install grpcio-health-checking")
            health_grpc = need_module("grpc_health.v1.health_pb2_grpc", "pip install grpcio-health-checking")
            self.health = health_mod.HealthServicer()
            self.health_pb2 = health_pb2
            self.set_health("", health)
            health_grpc.add_HealthServicer_to_server(self.health, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            with open(tls[0], "rb") as cert, open(tls[1], "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def set_health(self, service: str, status: str) -> None:
        self.health.set(service, getattr(self.health_pb2.HealthCheckResponse, status))

    def stop(self) -> None:
        self.service.release.set()
        self.server.stop(0).wait(5)


def channel(port: int):
    """A grpcio client channel to 127.0.0.1:port (cleartext, prior knowledge)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)])


def method(chan, name: str, kind: str = "unary_unary"):
    return getattr(chan, kind)(
        f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=_identity
    )
