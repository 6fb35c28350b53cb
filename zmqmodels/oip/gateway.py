"""The gateway: the Open Inference Protocol (KServe v2) over HTTP/REST and gRPC in front of one
node, translated to the node's own protocol over one pipelined DEALER (:class:`AsyncClient`).

One asyncio loop (uvloop when installed) runs the HTTP server (uvicorn with httptools parsing,
a plain ASGI app), the gRPC server (``grpc.aio``) and the node connection, so every request in
flight is one more id on that connection and a batching node sees them all. A watcher asks the
node ``MODELS`` every ``poll_s``: readiness, metadata and the "node is down" answer come from
its last reply, never from a guess; inference goes straight through (a pinned version is the
node's to refuse). Torch is never imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import uvicorn

from .. import __version__, defaults
from .. import protocol as P
from ..clients.aclient import AsyncClient
from ..errors import DeadlineError, ProtocolError, RemoteError, ZmqModelsError
from ..transport.curve import Curve
from ..transport.endpoints import parse_listen
from . import codec, grpc_service, triton
from .codec import V2Error

__all__ = ["Gateway"]

log = logging.getLogger("zmqmodels.gateway")
_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config|/stats)?/?$")
_JSON = [(b"content-type", b"application/json")]
_EXTENSIONS = ["binary_tensor_data"]


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # the gateway owns signals
        return contextlib.nullcontext()


class NodeView:
    """The node as last measured: its ``MODELS_REPLY`` and when it came (a watcher updates it)."""

    def __init__(self, address: str, down_after_s: float) -> None:
        self.address, self.down_after_s = address, down_after_s
        self.models: P.ModelsReply | None = None
        self.seen = 0.0
        self.error = "not asked yet"

    @property
    def up(self) -> bool:
        return bool(self.seen) and time.monotonic() - self.seen < self.down_after_s

    def check(self) -> P.ModelsReply:
        if not self.up or self.models is None:
            since = f" for {time.monotonic() - self.seen:.1f}s" if self.seen else ""
            raise V2Error(503, "UNAVAILABLE", f"node {self.address} is not answering{since}: {self.error}")
        return self.models

    def ready(self) -> str:
        """"" when every model the node serves has a version some worker holds, else why not."""
        models = self.check()
        waiting = [m.name for m in models.models if not any(v.workers for v in m.versions)]
        return f"not ready: no worker holds {', '.join(waiting)} yet" if waiting else ""


class NodeViews:
    """Every node the gateway sends to, as last measured: it answers while any node does
    (what it serves is read from a node that is up), and is ready while any node is."""

    def __init__(self, addresses: list[str], down_after_s: float) -> None:
        self.nodes = [NodeView(a, down_after_s) for a in addresses]
        self.down_after_s = down_after_s

    @property
    def up(self) -> bool:
        return any(v.up for v in self.nodes)

    def check(self) -> P.ModelsReply:
        why = []
        for v in self.nodes:
            try:
                return v.check()
            except V2Error as exc:
                why.append(str(exc))
        raise V2Error(503, "UNAVAILABLE", "; ".join(why))

    def ready(self) -> str:
        why = []
        for v in self.nodes:
            try:
                reason = v.ready()
            except V2Error as exc:
                reason = str(exc)
            if not reason:
                return ""
            why.append(reason if len(self.nodes) == 1 else f"{v.address}: {reason}")
        return "; ".join(why)


class Gateway:
    """``Gateway("tcp://node:6000", http="0.0.0.0:8000", grpc="0.0.0.0:8001").start()``.

    ``max_request_bytes``: the largest request accepted (the node's limit by default): an HTTP
    body announced larger is refused before it is read, a gRPC message larger is refused by
    gRPC. ``timeout``: how long one inference may take end to end (504 after it)."""

    def __init__(self, node: str | list[str], *, http: str | None = None, grpc_listen: str | None = None,
                 max_request_bytes: int = defaults.MAX_REQUEST_BYTES, timeout: float = 30.0,
                 poll_s: float = 0.5, down_after_s: float = 2.0, curve: Curve | None = None,
                 metrics: str | None = None, parent: int = 0) -> None:
        if http is None and grpc_listen is None:
            raise ZmqModelsError("a gateway needs --http, --grpc or both")
        self.metrics, self.stats = metrics, triton.Statistics()
        self.parent = parent  # a pid: stop once it is gone (serve --http's child outlives no node)
        self._metrics_server: Any = None
        self.nodes = [node] if isinstance(node, str) else list(node)
        self.node = ", ".join(self.nodes)
        self.http, self.grpc_listen = http, grpc_listen
        self.max_request_bytes, self.timeout, self.poll_s = max_request_bytes, timeout, poll_s
        self.view = NodeViews(self.nodes, down_after_s)
        self.curve = curve
        self.http_port = self.grpc_port = 0
        self._client: AsyncClient | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Gateway:
        """Serve from a background thread; return once both ports are bound."""
        self._thread = threading.Thread(target=self.run, name="zmqmodels-gateway", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise ZmqModelsError(f"gateway failed to start: {self._error or 'timed out'}")
        return self

    @property
    def serving(self) -> bool:
        """Its loop runs (false once closed, or stopped because its ``parent`` is gone)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has finished already
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self) -> None:
        """Serve until :meth:`close` (or, on the main thread, SIGINT/SIGTERM)."""
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            if threading.current_thread() is threading.main_thread():
                raise
            # on start()'s thread: start() raises it as one line; no "Exception in thread"
        finally:
            loop.close()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
        self._client = AsyncClient(self.nodes, timeout=self.timeout, retries=max(3, len(self.nodes)),
                                   curve=self.curve, arrays="numpy")
        watchers = [asyncio.ensure_future(self._watch(v)) for v in self.view.nodes]
        if self.parent:
            watchers.append(asyncio.ensure_future(self._orphaned()))
        grpc_server, http_server, tasks = None, None, list(watchers)
        try:
            if self.grpc_listen is not None:
                host, port = parse_listen(self.grpc_listen, "--grpc")
                _can_listen(host, port, "--grpc")  # gRPC's own refusal: a C log line, a bare RuntimeError
                grpc_server = grpc_service.server(self)
                self.grpc_port = grpc_server.add_insecure_port(f"{'[::]' if host == '::' else host}:{port}")
                await grpc_server.start()
            if self.http is not None:
                host, port = parse_listen(self.http, "--http")
                try:
                    sock = socket.create_server((host, port), backlog=1024)
                except OSError as exc:
                    raise ZmqModelsError(f"--http {host}:{port}: cannot listen: {_why(exc)}") from None
                self.http_port = sock.getsockname()[1]
                config = uvicorn.Config(self._asgi, interface="asgi3", lifespan="off", log_level="warning",
                                        access_log=False, http="httptools", ws="none", loop="none",
                                        proxy_headers=False, server_header=False, date_header=False,
                                        timeout_keep_alive=30)
                http_server = _Server(config)
                tasks.append(asyncio.ensure_future(http_server.serve(sockets=[sock])))
                while not http_server.started and not tasks[-1].done():
                    await asyncio.sleep(0.01)
            if self.metrics:
                from .metrics import GatewayMetrics

                self._metrics_server = GatewayMetrics(self, self.metrics)
            log.info("gateway to %s: http %s, grpc %s", self.node, self.http_port or "-",
                     self.grpc_port or "-")
            self._started.set()
            await self._stop.wait()
        finally:
            if self._metrics_server is not None:
                self._metrics_server.close()
            if http_server is not None:
                http_server.should_exit = True
            if grpc_server is not None:
                await grpc_server.stop(1.0)
            for w in watchers:
                w.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.close()

    async def _orphaned(self) -> None:
        while os.getppid() == self.parent:
            await asyncio.sleep(self.poll_s)
        log.warning("gateway: its node's process (pid %d) is gone; stopping", self.parent)
        assert self._stop is not None
        self._stop.set()

    async def _watch(self, view: NodeView) -> None:
        """Ask one node what it serves every ``poll_s`` (its own connection: a node that stops
        answering is seen as down within ``down_after_s``)."""
        async with AsyncClient(view.address, timeout=view.down_after_s, curve=self.curve,
                               arrays="numpy") as client:
            while True:
                try:
                    view.models = await client.models(timeout=view.down_after_s)
                    view.seen, view.error = time.monotonic(), ""
                except (ZmqModelsError, ProtocolError) as exc:
                    view.error = str(exc)
                await asyncio.sleep(self.poll_s)

    async def _infer(self, call: codec.Call, protocol: str) -> tuple[P.InferReply, list[Any]]:
        t0 = time.monotonic()
        try:
            hdr, frames = await self._forward(call)
        except V2Error as exc:
            self.stats.failed(call.model, str(call.seq or ""), time.monotonic() - t0)
            if self._metrics_server is not None:
                self._metrics_server.counted(call.model, protocol, exc.grpc.lower(), time.monotonic() - t0)
            raise
        self.stats.answered(call.model, hdr, time.monotonic() - t0)
        if self._metrics_server is not None:
            self._metrics_server.counted(call.model, protocol, "ok", time.monotonic() - t0)
        return hdr, frames

    async def _forward(self, call: codec.Call) -> tuple[P.InferReply, list[Any]]:
        self.view.check()
        assert self._client is not None
        spec, buffers = call.spec()
        # retryable errors are retried, all within the one end-to-end --timeout; with several
        # nodes an attempt gets half of it, so a node that hangs leaves time for another
        attempt_s = self.timeout if len(self.nodes) == 1 else self.timeout / 2
        try:
            hdr, frames, _ = await asyncio.wait_for(self._client.request(
                call.model, spec, buffers, seq=call.seq, timeout=attempt_s), self.timeout)
        except RemoteError as exc:
            raise codec.error_for(exc.code, exc.message) from None
        except (DeadlineError, TimeoutError):
            why = f"no reply from node {self.node} within {self.timeout:g}s"
            raise codec.error_for("deadline", why) from None
        return hdr, frames

    # -- HTTP/REST ---------------------------------------------------------------------------------
    async def _asgi(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                    send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        headers: list[tuple[bytes, bytes]] = _JSON
        try:
            status, body, headers = await self._route(method, path, scope, receive)
        except V2Error as exc:
            status, body = exc.status, msgspec.json.encode({"error": str(exc)})
            log.log(logging.WARNING if status >= 500 else logging.INFO, "%s %s -> %d: %s", method, path,
                    status, exc)
        except _Gone:
            return  # the client went away mid-request: nobody to answer
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, method: str, path: str, scope: dict[str, Any],
                     receive: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[int, bytes, list[Any]]:
        if path in ("/v2/repository/index", "/v2/models/stats"):
            body = await _read_body(receive, dict(scope["headers"]), 1 << 16)
            return self._triton_route(method, path, body)
        if path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/"):
            _method(method, "GET")
            if path == "/v2/health/live":
                return 200, b"", _JSON
            if path == "/v2/health/ready":
                why = self.view.ready()
                if why:
                    raise V2Error(503, "UNAVAILABLE", f"node {self.node}: {why}")
                return 200, b"", _JSON
            return 200, msgspec.json.encode(self._server_metadata()), _JSON
        m = _ROUTE.match(path)
        if m is None:
            raise V2Error(404, "NOT_FOUND", f"no endpoint {path[:100]!r} (the v2 protocol's are "
                                            "/v2/health/live|ready, /v2, "
                                            "/v2/models/NAME[/versions/V][/ready|/infer|/config|/stats], "
                                            "/v2/models/stats, /v2/repository/index)")
        name, version, action = m.group(1), m.group(2), m.group(3)
        seq = codec.parse_version(version)
        if action == "/infer":
            _method(method, "POST")
            hdrs = dict(scope["headers"])
            body = await _read_body(receive, hdrs, self.max_request_bytes)
            hlen = hdrs.get(b"inference-header-content-length")
            if hlen is not None and not hlen.isdigit():
                raise codec.bad("Inference-Header-Content-Length is not a number")
            call = codec.parse_http(body, name, version, None if hlen is None else int(hlen))
            reply, frames = await self._infer(call, "http")
            out, head = codec.http_response(call, reply, frames)
            if head is None:
                return 200, out, _JSON
            return 200, out, [(b"content-type", b"application/octet-stream"),
                              (b"inference-header-content-length", str(head).encode())]
        _method(method, "GET")
        if action == "/ready":
            codec.find_version(self.view.check(), name, seq)  # 404 / 503 with the reason
            return 200, b"", _JSON
        if action == "/config":
            return 200, msgspec.json.encode(triton.model_config(self.view.check(), name, seq)), _JSON
        if action == "/stats":
            codec.find_version(self.view.check(), name, seq)
            report = self.stats.report(self.view.check(), name, version or "")
            return 200, msgspec.json.encode(report), _JSON
        return 200, msgspec.json.encode(codec.model_metadata(self.view.check(), name, seq)), _JSON

    def _triton_route(self, method: str, path: str, body: bytes) -> tuple[int, bytes, list[Any]]:
        """Triton's ``POST /v2/repository/index`` (``{"ready": bool}``) and ``GET /v2/models/stats``."""
        if path == "/v2/models/stats":
            _method(method, "GET")
            return 200, msgspec.json.encode(self.stats.report(self.view.check())), _JSON
        _method(method, "POST")
        try:
            ready = bool(msgspec.json.decode(body or b"{}").get("ready", False))
        except (msgspec.DecodeError, AttributeError):
            raise codec.bad("the repository index request is not a JSON object") from None
        return 200, msgspec.json.encode(triton.repository_index(self.view.check(), ready)), _JSON

    def _server_metadata(self) -> dict[str, Any]:
        return {"name": "zmqmodels", "version": __version__, "extensions": _EXTENSIONS}

def _can_listen(host: str, port: int, option: str) -> None:
    """Raise the one-line reason if ``host:port`` cannot be listened on now."""
    try:
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as exc:
        raise ZmqModelsError(f"{option} {host}:{port}: cannot listen: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


class _Gone(Exception):
    """The HTTP client disconnected before its request was read."""


def _method(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise V2Error(405, "UNIMPLEMENTED", f"method {method} not allowed here (use {allowed})")


async def _read_body(receive: Callable[[], Awaitable[dict[str, Any]]], headers: dict[bytes, bytes],
                     limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed ``limit``: at once from
    Content-Length, else as the chunks arrive."""
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise V2Error(413, "RESOURCE_EXHAUSTED", f"request body of {int(length)} bytes is over the "
                                                 f"node's limit of {limit} bytes")
    parts, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _Gone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise V2Error(413, "RESOURCE_EXHAUSTED", f"request body over the node's limit of {limit} bytes")
        parts.append(chunk)
        if not msg.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)
