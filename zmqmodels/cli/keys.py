"""``zmqmodels keys``: make the keys that secure a fleet."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ZmqModelsError
from .group import cli

__all__: list[str] = []


@cli.group()
def keys() -> None:
    """Make the keys that secure a fleet."""


@keys.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write into (created; existing keys are never overwritten).")
@click.option("--curve", "curve_names", multiple=True, default=("hub", "node", "client"),
              show_default=True, help="CURVE certificates to make, by name; repeatable.")
@click.option("--no-signing", is_flag=True, help="CURVE certificates only.")
def keys_generate(out_dir: str, curve_names: tuple[str, ...], no_signing: bool) -> None:
    """Write an Ed25519 signing pair (signing.key, signing.pub) and CURVE certificates
    (public_keys/NAME.key, private_keys/NAME.key_secret). Secret files are mode 0600."""
    from ..release.signing import generate_signing_key
    from ..transport.curve import generate_curve_keys

    out = Path(out_dir)
    planned = [out / "public_keys" / f"{n}.key" for n in curve_names]
    planned += [] if no_signing else [out / "signing.key", out / "signing.pub"]
    if any(p.exists() for p in planned):
        raise ZmqModelsError(f"{next(p for p in planned if p.exists())} exists; not overwriting keys")
    written: list[Path] = []
    if not no_signing:
        written += generate_signing_key(out_dir)
    written += generate_curve_keys(out_dir, curve_names)
    for p in written:
        click.echo(str(p))
