"""Commands that run or read the hub: hub, status."""

from __future__ import annotations

import click

from .. import defaults
from . import cli
from .options import (
    curve_from,
    curve_options,
    limit_option,
    load_signing_key,
    load_trust,
    parse_limits,
    run_until_signalled,
    signing_option,
    trust_option,
)
from .render import emit_json, fleet_table, status_json

__all__: list[str] = []


@cli.command()
@click.option("--bind", "bind_addr", required=True, help="tcp://HOST:PORT or ipc://PATH (PUB: derived).")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False))
@click.option("--heartbeat", type=float, default=defaults.HEARTBEAT_INTERVAL_S, show_default=True,
              help="Seconds between heartbeats.")
@click.option("--lost-after", type=float, default=defaults.NODE_LOST_AFTER_S, show_default=True,
              help="Seconds without a report after which a node shows as lost (never counted).")
@click.option("--forget-after", type=float, default=defaults.NODE_FORGET_AFTER_S, show_default=True,
              help="Seconds without a report after which a node leaves the fleet table.")
@click.option("--retain", type=int, default=defaults.RETAIN_PER_NAME, show_default=True,
              help="Releases kept per model.")
@signing_option
@trust_option
@curve_options(server=True, client=False)
@click.option("--curve-publisher", "curve_publishers", multiple=True, type=click.Path(exists=True),
              help="Only these CURVE keys may publish, roll back or reserve (else: any admitted).")
@limit_option
def hub(bind_addr: str, store_dir: str, heartbeat: float, lost_after: float, forget_after: float,
        retain: int, signing_key: str | None,
        trust: tuple[str, ...], curve_key: str | None, curve_allow: tuple[str, ...],
        curve_publishers: tuple[str, ...], limits: tuple[str, ...]) -> None:
    """Run a hub: store releases, broadcast them, repair nodes, collect fleet status."""
    import logging

    from ..hub import Hub
    from ..store import Store

    curve = curve_from(curve_key, None, curve_allow)
    control = None
    if curve_publishers:
        from ..curve import public_keys

        if curve is None or curve.allow is None:
            raise click.UsageError("--curve-publisher needs --curve-key and --curve-allow")
        control = public_keys(curve_publishers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with Hub(bind_addr, Store(store_dir, retain=retain), heartbeat_interval_s=heartbeat,
             lost_after_s=lost_after, forget_after_s=forget_after,
             signing_key=load_signing_key(signing_key), trust=load_trust(trust), curve=curve,
             control_keys=control, limits=parse_limits(limits)) as h:
        click.echo(f"hub {h.hub_id} listening on {h.address} (PUB {h.pub_address}); Ctrl-C stops",
                   err=True)
        run_until_signalled()


@cli.command()
@click.option("--hub", "hub_addr", required=True)
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@curve_options(server=False, client=True)
def status(hub_addr: str, timeout: float, as_json: bool, curve_key: str | None,
           curve_server: str | None) -> None:
    """Print the fleet table: what every node serves, its state and its last error."""
    from ..control import HubClient

    st = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server)).status()
    if as_json:
        emit_json(status_json(st))
    else:
        click.echo(fleet_table(st))
