"""Commands that serve and query models: serve, gateway, infer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from .. import defaults
from ..core.swap import SwapPolicy
from .group import cli
from .options import (
    bind_to,
    connect_to,
    curve_from,
    curve_options,
    limit_option,
    load_trust,
    parse_limits,
    run_until_signalled,
    trust_option,
)
from .render import emit_json, to_jsonable

__all__: list[str] = []


@cli.command()
@click.option("--hub", "hub_addr", callback=connect_to, multiple=True,
              help="The hub's address (omit to serve the cache alone); repeat it for hubs on one "
                   "shared store: the node follows all of them.")
@click.option("--model", "models", multiple=True, required=True, help="Model name; repeatable.")
@click.option("--bind", "bind_addr", callback=bind_to,
              required=True, help="Address clients (REQ) connect to.")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Worker processes; with 2+ no request waits for a model load.")
@click.option("--device", "devices", multiple=True, default=("cpu",), show_default=True,
              help="cpu, cuda or cuda:N; once for all workers or once per worker.")
@click.option("--cache", "cache_dir", default=".zmqmodels/cache", show_default=True,
              type=click.Path(file_okay=False), help="Last validated release of each model.")
@click.option("--node-id", help="Name in the fleet table (default HOST-DIGEST of the cache directory: "
              "the same machine and cache keep one id across restarts).")
@click.option("--swap-policy", type=click.Choice([p.value for p in SwapPolicy]),
              default="availability", show_default=True,
              help="availability: load the new version beside the old; unload-first: free the "
                   "old one first (a GPU that cannot hold two).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per worker.")
@click.option("--metrics", "metrics", metavar="[HOST:]PORT",
              help="Serve Prometheus metrics on /metrics at this port.")
@click.option("--label", "labels", multiple=True, metavar="LABEL",
              help="A label waves and `activate --label` select on (canary, zone=a). Repeatable.")
@click.option("--max-batch", "max_batch", type=click.IntRange(min=1), default=defaults.MAX_BATCH,
              show_default=True,
              help="Rows joined into one forward, for releases proven batchable (1: no batching).")
@click.option("--batch-delay", "batch_delay_us", type=click.FloatRange(min=0),
              default=defaults.BATCH_DELAY_S * 1e6,
              show_default=True, metavar="MICROSECONDS",
              help="The longest a request waits for others to join it; only while recent load "
                   "says more are coming (one client at a time is never delayed).")
@click.option("--no-batch", "unbatched", multiple=True, metavar="MODEL",
              help="Never join this model's requests. Repeatable.")
@click.option("--http", "http", metavar="[HOST]:PORT",
              help="Also answer the Open Inference Protocol (KServe v2) over HTTP/REST here, with "
                   "/v2/health/live and /v2/health/ready for probes.")
@click.option("--grpc", "grpc_listen", metavar="[HOST]:PORT",
              help="Also answer the v2 GRPCInferenceService here.")
@trust_option
@curve_options(server=True, client=True)
@limit_option
def serve(hub_addr: tuple[str, ...] | None, models: tuple[str, ...], bind_addr: str, workers: int,
          devices: tuple[str, ...], cache_dir: str, node_id: str | None, swap_policy: str,
          threads: int, metrics: str | None, labels: tuple[str, ...], max_batch: int,
          batch_delay_us: float, unbatched: tuple[str, ...], trust: tuple[str, ...],
          curve_key: str | None, curve_server: str | None, curve_allow: tuple[str, ...],
          limits: tuple[str, ...], http: str | None, grpc_listen: str | None) -> None:
    """Serve inference (REQ/REP) with the newest valid release of each model.

    CURVE: --curve-key is this node's certificate, --curve-server the hub's, --curve-allow
    the clients admitted to --bind. --http/--grpc: the Open Inference Protocol beside it
    (not with CURVE: run `zmqmodels gateway` with an admitted client key instead)."""
    import logging

    from ..node.node import Node

    if (http or grpc_listen) and curve_key:
        raise click.UsageError("--http/--grpc would answer anyone in front of a CURVE-secured node: "
                               "run `zmqmodels gateway --curve-key KEY` (a client key it admits) instead")
    if curve_server and not curve_key:
        raise click.UsageError("--curve-server needs --curve-key: the node's certificate also "
                               "secures its inference socket")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with Node(hub_addr, list(models), bind_addr, workers=workers, devices=list(devices),
              cache=cache_dir, node_id=node_id, swap_policy=swap_policy,
              threads_per_worker=threads, trust=load_trust(trust),
              curve=curve_from(curve_key, curve_server, curve_allow), limits=parse_limits(limits),
              metrics=metrics, labels=list(labels), max_batch=max_batch,
              batch_delay_s=batch_delay_us / 1e6, unbatched=unbatched) as node:
        serving = f"node {node.node_id} serving {', '.join(models)} on {node.address}; Ctrl-C stops"
        if http or grpc_listen:
            from ..oip.process import GatewayProcess

            args = [*(["--http", http] if http else []), *(["--grpc", grpc_listen] if grpc_listen else []),
                    "--max-request-bytes", str(node.limits.max_request_bytes), "--parent", str(os.getpid())]
            gw = GatewayProcess(node.local_address, args).start()
            click.echo(serving, err=True)
            try:
                run_until_signalled(gw.check)  # restarted if it dies
            finally:
                gw.stop()
        else:
            click.echo(serving, err=True)
            run_until_signalled()


def _announce(gw: Any) -> None:
    ports = [f"HTTP :{gw.http_port}" if gw.http_port else "", f"gRPC :{gw.grpc_port}" if gw.grpc_port else ""]
    click.echo(f"Open Inference Protocol (KServe v2) for {gw.node} on {', '.join(p for p in ports if p)}",
               err=True)


@cli.command()
@click.option("--node", "node_addr", callback=connect_to, required=True, multiple=True,
              help="A node's address; repeat it to spread requests over several nodes (each request "
                   "goes to the least loaded live one and is retried on another if one fails).")
@click.option("--http", "http", metavar="[HOST]:PORT", help="Serve v2 HTTP/REST here.")
@click.option("--grpc", "grpc_listen", metavar="[HOST]:PORT", help="Serve the v2 GRPCInferenceService here.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds one inference may take end to end (then 504 / DEADLINE_EXCEEDED).")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=defaults.MAX_REQUEST_BYTES,
              show_default=True, help="Refuse larger requests before reading them (the node's limit).")
@click.option("--metrics", "metrics", metavar="[HOST:]PORT",
              help="Serve Prometheus metrics on /metrics at this port (and /health/live|ready).")
@click.option("--parent", type=int, default=0, hidden=True, help="Stop when this process is gone.")
@curve_options(server=False, client=True)
def gateway(node_addr: tuple[str, ...], http: str | None, grpc_listen: str | None, timeout: float,
            max_request_bytes: int, metrics: str | None, parent: int, curve_key: str | None,
            curve_server: str | None) -> None:
    """Answer the Open Inference Protocol (KServe v2, HTTP/REST and gRPC) for one node or several.

    Tritonclient, KServe clients, curl and Kubernetes probes reach the node through it; it
    keeps many requests in flight on one connection (a batching node joins them)."""
    import logging

    from ..oip.gateway import Gateway

    if not (http or grpc_listen):
        raise click.UsageError("give --http, --grpc or both")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with Gateway(list(node_addr), http=http, grpc_listen=grpc_listen, timeout=timeout,
                 max_request_bytes=max_request_bytes, curve=curve_from(curve_key, curve_server, ()),
                 metrics=metrics, parent=parent) as gw:
        _announce(gw)
        run_until_signalled(lambda: not gw.serving)


def parse_inputs(specs: tuple[str, ...]) -> tuple[Any, ...]:
    """``--input`` values as arrays: a spec gives seeded random numpy arrays and a ``.npy``
    file its array, without torch; any other file is read as a ``torch.save``'d tensor or
    tuple (``weights_only``), which imports torch."""
    from ..errors import ProtocolError, SourceError
    from ..protocol.tensors import random_arrays

    args: list[Any] = []
    for i, spec in enumerate(specs):
        if Path(spec).is_file():
            if spec.endswith(".npy"):
                import numpy as np

                try:
                    args.append(np.load(spec, allow_pickle=False))
                except ValueError as exc:
                    raise SourceError(f"cannot read {spec}: {exc}") from None
                continue
            from ..model.sources import load_example_file

            data = load_example_file(spec)
            args.extend(data if isinstance(data, tuple) else [data])
        else:
            try:
                args.extend(random_arrays(spec, seed=i))
            except ProtocolError as exc:
                raise click.BadParameter(f"{exc} (or the path of a .npy or torch.save'd file)",
                                         param_hint="--input") from None
    return tuple(args)


@cli.command()
@click.option("--server", callback=connect_to, required=True, multiple=True,
              help="A serving node's address; repeat it to spread requests over several nodes (a "
                   "node that fails an attempt is skipped and the request retried on another).")
@click.option("--model", required=True)
@click.option("--input", "inputs", multiple=True,
              help="DIMx...[:dtype] (random), a .npy file, or a torch.save'd tensor/tuple file; "
                   "one per argument.")
@click.option("--inputs-file", "inputs_file", type=click.Path(dir_okay=False),
              help="Many requests: a torch.save'd list, one item (a tensor or a tuple of "
                   "arguments) per request, sent pipelined on one connection.")
@click.option("--in-flight", "in_flight", type=click.IntRange(min=1), default=16, show_default=True,
              help="With --inputs-file: requests outstanding at once.")
@click.option("--seq", "seq", type=int, default=0,
              help="Pin a release by seq (0: the newest served).")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds one attempt may wait for its answer.")
@click.option("--retries", type=int, default=3, show_default=True,
              help="Further attempts after a failed one (so at most --timeout x (retries + 1) in all).")
@click.option("--json", "as_json", is_flag=True)
@curve_options(server=False, client=True)
def infer(server: tuple[str, ...], model: str, inputs: tuple[str, ...], inputs_file: str | None,
          in_flight: int, seq: int, timeout: float, retries: int, as_json: bool, curve_key: str | None,
          curve_server: str | None) -> None:
    """Send one inference request and print the outputs and the version that served them
    (--inputs-file: many, pipelined, and a summary)."""
    from ..clients.client import Client

    if bool(inputs) == bool(inputs_file):
        raise click.UsageError("give --input (one request) or --inputs-file (many), not both or neither")
    if inputs_file:
        _infer_many(list(server), model, inputs_file, in_flight, seq, timeout, retries, as_json,
                    curve_from(curve_key, curve_server))
        return
    args = parse_inputs(inputs)

    def retrying(attempt: int, exc: Exception) -> None:
        click.echo(f"attempt {attempt} of {retries + 1}: {exc}; retrying", err=True)

    with Client(list(server), timeout=timeout, retries=retries, arrays="numpy", on_retry=retrying,
                curve=curve_from(curve_key, curve_server)) as client:
        r = client.infer(model, *args, seq=seq)
    if as_json:
        emit_json({"model": r.model, "label": r.label, "seq": r.seq, "worker": r.worker,
                    "latency_ms": round(r.latency_ms, 3), "queue_ms": r.queue_ms,
                    "infer_ms": r.infer_ms, "attempts": r.attempts, "outputs": to_jsonable(r.outputs)})
        return
    click.echo(f"{r.model} {r.label or '-'} (seq {r.seq}) served by {r.worker} in "
               f"{r.latency_ms:.2f} ms (model {r.infer_ms:.2f} ms)")
    click.echo(str(r.outputs))


def _infer_many(server: list[str], model: str, path: str, in_flight: int, seq: int, timeout: float,
                retries: int, as_json: bool, curve: Any) -> None:
    import asyncio
    import time

    from ..clients.aclient import AsyncClient
    from ..errors import SourceError
    from ..model.sources import load_example_file

    items = load_example_file(path)
    if not isinstance(items, list):
        raise SourceError(f"{path} holds one request; --inputs-file takes a list (one item per request)")

    async def run() -> tuple[list[Any], float]:
        async with AsyncClient(server, timeout=timeout, retries=retries, arrays="numpy", curve=curve) as c:
            t0 = time.perf_counter()
            got = await c.infer_many(model, items, in_flight=in_flight, seq=seq, return_exceptions=True)
            return got, time.perf_counter() - t0

    results, took = asyncio.run(run())
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if as_json:
        emit_json({"requests": len(results), "failed": len(failed), "seconds": round(took, 3),
                   "results": [{"error": str(r)} if isinstance(r, BaseException) else
                               {"seq": r.seq, "label": r.label, "batch": r.batch,
                                "latency_ms": round(r.latency_ms, 3), "outputs": to_jsonable(r.outputs)}
                               for r in results]})
    else:
        for i, exc in failed:
            click.echo(f"request {i}: {exc}", err=True)
        lat = sorted(r.latency_ms for r in ok)
        p50 = f", p50 {lat[len(lat) // 2]:.2f} ms" if lat else ""
        mean_batch = sum(r.batch for r in ok) / len(ok) if ok else 0
        click.echo(f"{len(ok)} of {len(results)} answered in {took:.2f}s ({len(results) / took:.0f} req/s, "
                   f"{in_flight} in flight{p50}, mean batch {mean_batch:.1f} rows)")
    if failed:
        raise SystemExit(1)

