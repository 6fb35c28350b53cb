"""Commands that run or read the hub: hub, status, releases, activate, relay."""

from __future__ import annotations

from time import monotonic as time_now
from time import sleep
from typing import Any

import click

from .. import defaults
from .group import cli
from .options import (
    bind_to,
    connect_to,
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
@click.option("--bind", "bind_addr", callback=bind_to,
              required=True, help="tcp://HOST:PORT or ipc://PATH (PUB: derived).")
@click.option("--store", "store_dir", required=True, metavar="DIRECTORY|s3://BUCKET/PREFIX",
              help="Where releases live: a directory, or S3-compatible object storage shared by "
                   "several hubs (AWS_ENDPOINT_URL, credentials and region as the AWS CLI reads them).")
@click.option("--heartbeat", type=float, default=defaults.HEARTBEAT_INTERVAL_S, show_default=True,
              help="Seconds between heartbeats.")
@click.option("--lost-after", type=float, default=defaults.NODE_LOST_AFTER_S, show_default=True,
              help="Seconds without a report after which a node shows as lost (never counted).")
@click.option("--forget-after", type=float, default=defaults.NODE_FORGET_AFTER_S, show_default=True,
              help="Seconds without a report after which a node leaves the fleet table.")
@click.option("--metrics", "metrics", metavar="[HOST:]PORT",
              help="Serve Prometheus metrics on /metrics at this port.")
@click.option("--retain", type=int, default=defaults.RETAIN_PER_NAME, show_default=True,
              help="Distinct releases kept per model (0: no limit by count). The active, staged and "
                   "pinned ones are always kept.")
@click.option("--retain-for", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Also keep every release younger than this (0: no limit by age).")
@signing_option
@trust_option
@curve_options(server=True, client=False)
@click.option("--curve-publisher", "curve_publishers", multiple=True, type=click.Path(exists=True),
              help="Only these CURVE keys may publish, roll back or reserve (else: any admitted).")
@limit_option
def hub(bind_addr: str, store_dir: str, heartbeat: float, lost_after: float, forget_after: float,
        metrics: str | None, retain: int, retain_for: float, signing_key: str | None,
        trust: tuple[str, ...], curve_key: str | None, curve_allow: tuple[str, ...],
        curve_publishers: tuple[str, ...], limits: tuple[str, ...]) -> None:
    """Run a hub: store releases, broadcast them, repair nodes, collect fleet status."""
    import logging

    from ..hub.hub import Hub
    from ..release.catalog import Retention
    from ..release.store import open_store

    curve = curve_from(curve_key, None, curve_allow)
    control = None
    if curve_publishers:
        from ..transport.curve import public_keys

        if curve is None or curve.allow is None:
            raise click.UsageError("--curve-publisher needs --curve-key and --curve-allow")
        control = public_keys(curve_publishers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    store = open_store(store_dir, retention=Retention(retain, retain_for))
    with Hub(bind_addr, store, heartbeat_interval_s=heartbeat,
             lost_after_s=lost_after, forget_after_s=forget_after, metrics=metrics,
             signing_key=load_signing_key(signing_key), trust=load_trust(trust), curve=curve,
             control_keys=control, limits=parse_limits(limits)) as h:
        click.echo(f"hub {h.hub_id} listening on {h.address} (PUB {h.pub_address}); Ctrl-C stops",
                   err=True)
        run_until_signalled()


@cli.command()
@click.option("--hub", "hub_addr", callback=connect_to, required=True, multiple=True,
              help="A hub's address; repeat it for hubs on one shared store (tried in turn).")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Redraw the table every --interval seconds until Ctrl-C.")
@click.option("--interval", type=float, default=1.0, show_default=True)
@curve_options(server=False, client=True)
def status(hub_addr: tuple[str, ...], timeout: float, as_json: bool, watch: bool, interval: float,
           curve_key: str | None, curve_server: str | None) -> None:
    """Print the fleet table: what every node serves, its state and its last error."""
    import time

    from ..clients.hub import HubClient

    client = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server))
    try:
        while True:
            st = client.status()
            if as_json:
                emit_json(status_json(st))
            elif watch:
                click.clear()
                click.echo(f"{time.strftime('%H:%M:%S')}  (every {interval:g}s; Ctrl-C stops)\n"
                           f"{fleet_table(st)}")
            else:
                click.echo(fleet_table(st))
            if not watch:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        if not watch:
            raise
        click.echo("", err=True)  # Ctrl-C is how a watch ends: not an error


@cli.command()
@click.argument("name")
@click.option("--seq", type=int, required=True, help="The staged release to serve.")
@click.option("--hub", "hub_addr", callback=connect_to, required=True, multiple=True,
              help="A hub's address; repeat it for hubs on one shared store (tried in turn).")
@click.option("--nodes", "nodes", default="", metavar="ID,ID", help="Only these nodes.")
@click.option("--label", "labels", multiple=True, help="Only nodes carrying this label. Repeatable.")
@click.option("--wait", "wait", is_flag=True, help="Wait until the activated nodes serve it.")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@curve_options(server=False, client=True)
def activate(name: str, seq: int, hub_addr: tuple[str, ...], nodes: str, labels: tuple[str, ...],
             wait: bool, timeout: float, as_json: bool, curve_key: str | None,
             curve_server: str | None) -> None:
    """Serve staged release SEQ of NAME: on --nodes / --label, or (neither) on every node."""
    import sys

    import msgspec

    from ..clients.hub import HubClient
    from ..core.fleet import tally
    from ..protocol import ModelState

    client = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server))
    picked = [n for n in nodes.split(",") if n.strip()]
    done = client.activate(name, seq, nodes=picked, labels=list(labels))
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    who = "every node" if done.fleet else ", ".join(done.nodes)
    say(f"activated {name} seq {seq} on {who}")
    ok, st = True, None
    if wait:
        want = None if done.fleet else set(done.nodes)
        deadline = time_now() + timeout
        while True:
            st = client.status()
            live = [r for r in st.nodes if r.state != ModelState.LOST]
            t = tally(live, name, seq, or_newer=True, nodes=want)
            if t.rejected or (t.rows and t.serving == t.rows) or time_now() > deadline:
                ok = not t.rejected and bool(t.rows) and t.serving == t.rows
                break
            sleep(0.2)
        for r in live:
            if r.model == name and r.node in t.rejected:
                say(f"  {r.node} rejected seq {seq}: {r.last_error}")
        say(f"{'ok' if ok else 'FAILED'}: {t.serving}/{t.rows} activated node(s) serve seq {seq}")
    if as_json:
        emit_json({"ok": ok, "activated": msgspec.to_builtins(done),
                   "status": status_json(st) if st is not None else None})
    if not ok:
        sys.exit(1)


@cli.command()
@click.argument("name", required=False, default="")
@click.option("--hub", "hub_addr", callback=connect_to, required=True, multiple=True,
              help="A hub's address; repeat it for hubs on one shared store (tried in turn).")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@curve_options(server=False, client=True)
def releases(name: str, hub_addr: tuple[str, ...], timeout: float, as_json: bool,
             curve_key: str | None, curve_server: str | None) -> None:
    """List the stored releases (of NAME, or of every model): what can be rolled back to."""
    import datetime

    import msgspec

    from ..clients.hub import HubClient

    rows = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server)).releases(name)
    if as_json:
        emit_json(msgspec.to_builtins(rows))
        return
    table = [("MODEL", "SEQ", "LABEL", "CREATED", "ARCHIVE", "CODEC", "SIGNER", "ROLLBACK OF", "SERVING",
              "PINNED")]
    for r in rows:
        created = datetime.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S")
        table.append((r.name, str(r.seq), r.label or "-", created, f"{r.archive_bytes / 2**20:.1f} MiB",
                      r.codec, r.signer[:16] or "unsigned", str(r.rollback_of or "-"), str(r.serving),
                      "pinned" if r.pinned else ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _pin(name: str, to: str, hub_addr: tuple[str, ...], timeout: float, curve_key: str | None,
         curve_server: str | None, on: bool) -> None:
    from ..clients.hub import HubClient

    got = HubClient(hub_addr, timeout=timeout, curve=curve_from(curve_key, curve_server)).pin(name, to, on=on)
    pins = ", ".join(map(str, got.pins)) or "none"
    click.echo(f"{name} seq {got.seq} {'pinned' if on else 'unpinned'} (pinned now: {pins})")


_pin_options = [click.argument("name"), click.argument("to", metavar="SEQ|LABEL"),
                click.option("--hub", "hub_addr", callback=connect_to, required=True, multiple=True),
                click.option("--timeout", type=float, default=10.0, show_default=True),
                curve_options(server=False, client=True)]


def _with_pin_options(fn: Any) -> Any:
    for option in reversed(_pin_options):
        fn = option(fn)
    return fn


@cli.command()
@_with_pin_options
def pin(name: str, to: str, hub_addr: tuple[str, ...], timeout: float, curve_key: str | None,
        curve_server: str | None) -> None:
    """Keep a stored release (by seq or label) through retention until it is unpinned."""
    _pin(name, to, hub_addr, timeout, curve_key, curve_server, True)


@cli.command()
@_with_pin_options
def unpin(name: str, to: str, hub_addr: tuple[str, ...], timeout: float, curve_key: str | None,
          curve_server: str | None) -> None:
    """Let retention prune a pinned release again."""
    _pin(name, to, hub_addr, timeout, curve_key, curve_server, False)


@cli.command()
@click.option("--hub", "hub_addr", callback=connect_to, required=True, multiple=True,
              help="The upstream: the root hub or another relay (repeat it for hubs on one shared "
                   "store).")
@click.option("--bind", "bind_addr", callback=bind_to,
              required=True, help="Where nodes (or relays) connect: tcp://HOST:PORT "
              "(PUB on PORT+1) or ipc://PATH.")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Where complete releases are kept (served at once after a restart).")
@click.option("--model", "models", multiple=True, help="Model to relay; repeatable (default: every model).")
@click.option("--relay-id", help="Name in the fleet table's VIA (default relay-HOST-PID-…).")
@click.option("--metrics", "metrics", metavar="[HOST:]PORT",
              help="Serve Prometheus metrics on /metrics at this port.")
@trust_option
@curve_options(server=True, client=True)
@limit_option
def relay(hub_addr: tuple[str, ...], bind_addr: str, store_dir: str, models: tuple[str, ...],
          relay_id: str | None, metrics: str | None, trust: tuple[str, ...], curve_key: str | None,
          curve_server: str | None,
          curve_allow: tuple[str, ...], limits: tuple[str, ...]) -> None:
    """Subscribe to a hub once and republish its releases, chunk by chunk, to nodes behind it.

    CURVE: --curve-key is this relay's certificate (server to its nodes, client upstream),
    --curve-server the upstream's, --curve-allow the nodes admitted."""
    import logging

    from ..hub.relay import Relay

    up = curve_from(curve_key, curve_server) if curve_server else None
    down = curve_from(curve_key, None, curve_allow) if curve_key else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with Relay(list(hub_addr), bind_addr, store_dir, list(models), relay_id=relay_id,
               limits=parse_limits(limits), trust=load_trust(trust), curve=down, upstream_curve=up,
               metrics=metrics) as r:
        click.echo(f"relay {r.relay_id}: following {', '.join(hub_addr)}, serving on {r.address} (PUB "
                   f"{r.pub_address}); Ctrl-C stops", err=True)
        run_until_signalled()
