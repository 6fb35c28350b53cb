"""Which node takes a request, sans I/O: the ZeroMQ guide's Freelance pattern, done fully.

A client that knows several nodes feeds a :class:`Balancer` what happened (sent, answered,
timed out, refused the connection, answered a retryable error or "seq not here") with the time,
and asks it where the next attempt goes. Rules:

- **Least loaded**: the live node with the fewest requests in flight from this client, then the
  one used longest ago (so a client with one request at a time goes round the nodes, and a node
  back from a failure gets its share at once; latency is kept for the record, not for choosing:
  chasing the fastest node would pile every client onto it).
- **Skip the failing**: a node that timed out, refused the connection or answered a retryable
  error (``not_ready``, ``worker_lost``, ``unavailable``, ``busy``) is out of rotation for a
  back-off (``SUSPECT_S``, doubling per failure in a row up to ``SUSPECT_MAX_S``); an answer
  puts it back at once. When every node is out, the one due back first is tried (a fleet
  restarting is still reached).
- **One attempt per node**: an attempt never goes to a node this request already tried while
  another one it has not tried is live.
- **Pinned seqs**: a node that answered ``version_unavailable`` for a seq is not asked for that
  seq again for ``SUSPECT_MAX_S``; a node that served a seq is preferred for it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

__all__ = ["Balancer", "Peer", "RETRYABLE", "SUSPECT_S", "SUSPECT_MAX_S"]

SUSPECT_S = 0.5
SUSPECT_MAX_S = 30.0
RETRYABLE = frozenset({"not_ready", "worker_lost", "unavailable", "busy"})
_EWMA = 0.2


@dataclass
class Peer:
    address: str
    in_flight: int = 0
    latency_s: float = 0.0  # smoothed time to an answer (0: none yet)
    failures: int = 0  # in a row
    out_until: float = 0.0  # out of rotation until then
    last_used: float = 0.0
    why: str = ""  # the last failure, for the error a caller finally sees
    not_here: dict[int, float] = field(default_factory=dict)  # seq -> until (version_unavailable)
    served: set[int] = field(default_factory=set)  # seqs it answered with

    def live(self, now: float) -> bool:
        return self.out_until <= now


class Balancer:
    def __init__(self, addresses: Sequence[str]) -> None:
        if not addresses:
            raise ValueError("no node addresses")
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"a node address is listed twice: {list(addresses)}")
        self.peers = {a: Peer(a) for a in addresses}

    def pick(self, now: float, *, tried: Collection[str] = (), seq: int = 0) -> str:
        """Where the next attempt goes."""
        peers = [p for p in self.peers.values() if not (seq and p.not_here.get(seq, 0) > now)]
        if not peers:
            peers = list(self.peers.values())
        fresh = [p for p in peers if p.address not in tried] or peers
        live = [p for p in fresh if p.live(now)]
        if not live:
            return min(fresh, key=lambda p: (p.out_until, p.last_used)).address
        best = min(live, key=lambda p: (seq not in p.served if seq else False, p.in_flight, p.last_used))
        return best.address

    def sent(self, address: str, now: float) -> None:
        p = self.peers[address]
        p.in_flight += 1
        p.last_used = now

    def answered(self, address: str, seconds: float, seq: int) -> None:
        p = self.peers[address]
        p.in_flight = max(0, p.in_flight - 1)
        p.latency_s = seconds if not p.latency_s else (1 - _EWMA) * p.latency_s + _EWMA * seconds
        p.failures, p.out_until, p.why = 0, 0.0, ""
        p.served.add(seq)

    def failed(self, address: str, now: float, why: str) -> None:
        """A timeout, a refused connection or a retryable error: out for a back-off."""
        p = self.peers[address]
        p.in_flight = max(0, p.in_flight - 1)
        p.failures += 1
        p.out_until = now + min(SUSPECT_MAX_S, SUSPECT_S * 2 ** (p.failures - 1))
        p.why = why

    def not_held(self, address: str, seq: int, now: float) -> None:
        """It answered ``version_unavailable`` for ``seq``."""
        p = self.peers[address]
        p.in_flight = max(0, p.in_flight - 1)
        p.not_here[seq] = now + SUSPECT_MAX_S
        p.served.discard(seq)

    def settled(self, address: str) -> None:
        """An answer that says nothing of the node's health (a non-retryable error)."""
        p = self.peers[address]
        p.in_flight = max(0, p.in_flight - 1)

    def live(self, now: float) -> list[str]:
        return [p.address for p in self.peers.values() if p.live(now)]

    def failures(self) -> str:
        """Each node's last failure, for a final error."""
        return "; ".join(f"{p.address}: {p.why}" for p in self.peers.values() if p.why)
