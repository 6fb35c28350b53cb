"""The gateway's gRPC face: ``inference.GRPCInferenceService`` (the v2 calls and Triton's
ModelConfig, ModelStatistics, RepositoryIndex and the streaming ModelStreamInfer) answered from
the :class:`~zmqmodels.oip.gateway.Gateway` it serves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from . import codec, triton
from .codec import V2Error
from .pb import SERVICE, message

__all__ = ["server", "STREAM_IN_FLIGHT"]

log = logging.getLogger("zmqmodels.gateway")
STREAM_IN_FLIGHT = 1024  # requests one ModelStreamInfer stream may have in flight


def server(gateway: Any) -> grpc.aio.Server:
    """A ``grpc.aio`` server answering for ``gateway`` (not started, no port yet)."""
    return GrpcService(gateway).server()


class GrpcService:
    def __init__(self, gateway: Any) -> None:
        self.gw = gateway

    def server(self) -> grpc.aio.Server:
        limit = self.gw.max_request_bytes + (1 << 16)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", -1),
                                          ("grpc.so_reuseport", 0)])
        calls = {"ServerLive": self._g_live, "ServerReady": self._g_ready, "ModelReady": self._g_model_ready,
                 "ServerMetadata": self._g_server_metadata, "ModelMetadata": self._g_model_metadata,
                 "ModelInfer": self._g_infer, "ModelConfig": self._g_config,
                 "ModelStatistics": self._g_statistics, "RepositoryIndex": self._g_index}
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            _aborting(fn), request_deserializer=message(f"{name}Request").FromString,
            response_serializer=message(f"{name}Response").SerializeToString) for name, fn in calls.items()}
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self._g_stream, request_deserializer=message("ModelInferRequest").FromString,
            response_serializer=message("ModelStreamInferResponse").SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return server

    async def _g_live(self, req: Any) -> Any:
        return message("ServerLiveResponse")(live=True)

    async def _g_ready(self, req: Any) -> Any:
        try:
            return message("ServerReadyResponse")(ready=not self.gw.view.ready())
        except V2Error:
            return message("ServerReadyResponse")(ready=False)

    async def _g_model_ready(self, req: Any) -> Any:
        try:
            codec.find_version(self.gw.view.check(), req.name, codec.parse_version(req.version))
            return message("ModelReadyResponse")(ready=True)
        except V2Error as exc:
            if exc.status == 400:
                raise
            return message("ModelReadyResponse")(ready=False)

    async def _g_server_metadata(self, req: Any) -> Any:
        return message("ServerMetadataResponse")(**self.gw._server_metadata())

    async def _g_model_metadata(self, req: Any) -> Any:
        meta = codec.model_metadata(self.gw.view.check(), req.name, codec.parse_version(req.version))
        return message("ModelMetadataResponse")(**meta)

    async def _g_infer(self, req: Any) -> Any:
        call = codec.parse_grpc(req)
        reply, frames = await self.gw._infer(call, "grpc")
        resp = message("ModelInferResponse")(model_name=reply.model, model_version=str(reply.seq), id=call.id)
        for name, dtype, shape, raw in codec.outputs_of(reply.outputs, frames, call.outputs):
            out = resp.outputs.add()
            out.name, out.datatype = name, codec.v2_name(dtype)
            out.shape.extend(shape)
            resp.raw_output_contents.append(bytes(raw))
        return resp

    async def _g_config(self, req: Any) -> Any:
        config = triton.model_config(self.gw.view.check(), req.name, codec.parse_version(req.version))
        return json_format.ParseDict({"config": config}, message("ModelConfigResponse")())

    async def _g_statistics(self, req: Any) -> Any:
        if req.name:
            codec.find_version(self.gw.view.check(), req.name, codec.parse_version(req.version))
        report = self.gw.stats.report(self.gw.view.check(), req.name, req.version)
        return json_format.ParseDict(report, message("ModelStatisticsResponse")())

    async def _g_index(self, req: Any) -> Any:
        index = triton.repository_index(self.gw.view.check(), req.ready)
        return json_format.ParseDict({"models": index}, message("RepositoryIndexResponse")())

    async def _g_stream(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """``ModelStreamInfer``: every request on the stream runs at once (a batching node joins
        them); each answer, or its error as ``error_message``, goes back as it completes."""
        done: asyncio.Queue[Any] = asyncio.Queue()
        # a stream reads no further while this many requests are running or answered but unsent
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def one(req: Any) -> None:
            try:
                await done.put(message("ModelStreamInferResponse")(infer_response=await self._g_infer(req)))
            except V2Error as exc:
                await done.put(message("ModelStreamInferResponse")(error_message=str(exc)))

        async def read() -> int:
            tasks = []
            async for r in requests:
                await room.acquire()
                tasks.append(asyncio.ensure_future(one(r)))
            await asyncio.gather(*tasks)
            return len(tasks)

        reader = asyncio.ensure_future(read())
        sent = 0
        while not (reader.done() and sent == reader.result()):
            get = asyncio.ensure_future(done.get())
            await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                yield get.result()
                sent += 1
                room.release()
            else:
                get.cancel()
        reader.result()  # a broken stream's error is the call's


def _aborting(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """A gRPC handler that answers a :class:`V2Error` with its status and message."""

    async def handler(req: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(req)
        except V2Error as exc:
            log.log(logging.WARNING if exc.status >= 500 else logging.INFO, "grpc %s: %s", exc.grpc, exc)
            await context.abort(getattr(grpc.StatusCode, exc.grpc), str(exc))

    return handler
