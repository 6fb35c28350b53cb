"""Commands that serve and query models: serve, infer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

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
@click.option("--hub", "hub_addr", callback=connect_to,
              help="The hub's address (omit to serve the cache alone).")
@click.option("--model", "models", multiple=True, required=True, help="Model name; repeatable.")
@click.option("--bind", "bind_addr", callback=bind_to,
              required=True, help="Address clients (REQ) connect to.")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Worker processes; with 2+ no request waits for a model load.")
@click.option("--device", "devices", multiple=True, default=("cpu",), show_default=True,
              help="cpu, cuda or cuda:N; once for all workers or once per worker.")
@click.option("--cache", "cache_dir", default=".zmqmodels/cache", show_default=True,
              type=click.Path(file_okay=False), help="Last validated release of each model.")
@click.option("--node-id", help="Name in the fleet table (default HOST-PID).")
@click.option("--swap-policy", type=click.Choice([p.value for p in SwapPolicy]),
              default="availability", show_default=True,
              help="availability: load the new version beside the old; unload-first: free the "
                   "old one first (a GPU that cannot hold two).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per worker.")
@click.option("--metrics", "metrics", metavar="[HOST:]PORT",
              help="Serve Prometheus metrics on /metrics at this port.")
@click.option("--label", "labels", multiple=True, metavar="LABEL",
              help="A label waves and `activate --label` select on (canary, zone=a). Repeatable.")
@trust_option
@curve_options(server=True, client=True)
@limit_option
def serve(hub_addr: str | None, models: tuple[str, ...], bind_addr: str, workers: int,
          devices: tuple[str, ...], cache_dir: str, node_id: str | None, swap_policy: str,
          threads: int, metrics: str | None, labels: tuple[str, ...], trust: tuple[str, ...],
          curve_key: str | None, curve_server: str | None, curve_allow: tuple[str, ...],
          limits: tuple[str, ...]) -> None:
    """Serve inference (REQ/REP) with the newest valid release of each model.

    CURVE: --curve-key is this node's certificate, --curve-server the hub's, --curve-allow
    the clients admitted to --bind."""
    import logging

    from ..node import Node

    if curve_server and not curve_key:
        raise click.UsageError("--curve-server needs --curve-key: the node's certificate also "
                               "secures its inference socket")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with Node(hub_addr, list(models), bind_addr, workers=workers, devices=list(devices),
              cache=cache_dir, node_id=node_id, swap_policy=swap_policy,
              threads_per_worker=threads, trust=load_trust(trust),
              curve=curve_from(curve_key, curve_server, curve_allow), limits=parse_limits(limits),
              metrics=metrics, labels=list(labels)) as node:
        click.echo(f"node {node.node_id} serving {', '.join(models)} on {node.address}; "
                   "Ctrl-C stops", err=True)
        run_until_signalled()


def parse_inputs(specs: tuple[str, ...]) -> tuple[Any, ...]:
    """``--input`` values as arrays: a spec gives seeded random numpy arrays and a ``.npy``
    file its array, without torch; any other file is read as a ``torch.save``'d tensor or
    tuple (``weights_only``), which imports torch."""
    from ..errors import ProtocolError, SourceError
    from ..tensors import random_arrays

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
            from ..sources import load_example_file

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
@click.option("--server", callback=connect_to, required=True, help="A serving node's address.")
@click.option("--model", required=True)
@click.option("--input", "inputs", multiple=True, required=True,
              help="DIMx...[:dtype] (random), a .npy file, or a torch.save'd tensor/tuple file; "
                   "one per argument.")
@click.option("--seq", "seq", type=int, default=0,
              help="Pin a release by seq (0: the newest served).")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--retries", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@curve_options(server=False, client=True)
def infer(server: str, model: str, inputs: tuple[str, ...], seq: int, timeout: float,
          retries: int, as_json: bool, curve_key: str | None, curve_server: str | None) -> None:
    """Send one inference request and print the outputs and the version that served them."""
    from ..client import Client

    args = parse_inputs(inputs)

    def retrying(attempt: int, exc: Exception) -> None:
        click.echo(f"attempt {attempt} of {retries + 1}: {exc}; retrying", err=True)

    with Client(server, timeout=timeout, retries=retries, arrays="numpy", on_retry=retrying,
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
