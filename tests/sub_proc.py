"""A subscriber process for tests: prints one JSON line per event on stdout.

    python -m tests.sub_proc --hub ADDR --model NAME [--model ...] [--rcvhwm N] [--load]

Without --load it hashes each verified archive, prints it and reports ``serving`` (the
network side alone); with --load it uses the embedded loader and prints each swap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading

from zmqmodels import FollowOptions, Subscriber


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hub", required=True)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rcvhwm", type=int)
    ap.add_argument("--node-id")
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--cache")
    args = ap.parse_args()
    lock = threading.Lock()
    sub: Subscriber

    def emit(**event: object) -> None:
        with lock:
            print(json.dumps({**event, "stats": dict(sub.stats)}), flush=True)

    def on_release(m, archive) -> None:  # noqa: ANN001
        emit(event="release", name=m.name, seq=m.seq, label=m.label,
             sha256=hashlib.sha256(archive).hexdigest(), bytes=len(archive))
        sub.report(m.name, "serving", seq=m.seq, label=m.label)

    extra = {"rcvhwm": args.rcvhwm} if args.rcvhwm else {}
    sub = Subscriber(args.hub, args.model, follow=FollowOptions(node_id=args.node_id, **extra),
                     on_release=None if args.load else on_release, load=args.load, cache=args.cache)
    if args.load:
        sub.on_swap(lambda name, new, old: emit(event="swap", name=name, seq=new.seq, label=new.label))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with sub:
        emit(event="started", node=sub.node_id)
        stop.wait()
        emit(event="stopping")


if __name__ == "__main__":
    sys.exit(main())
