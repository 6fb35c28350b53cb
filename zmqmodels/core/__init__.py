"""The cores: the code that decides, sans I/O.

Each core is a plain class fed events and the clock that returns actions; the shells
(:mod:`zmqmodels.hub.hub`, :mod:`zmqmodels.hub.relay`, :mod:`zmqmodels.node.node`,
:mod:`zmqmodels.node.follower`, :mod:`zmqmodels.node.embedded`, :mod:`zmqmodels.node.worker`) own the
sockets, threads and files and carry the actions out. Nothing here imports zmq, torch,
threading, subprocess or socket, so a unit test reaches every branch.

- :mod:`.intake`: one release coming in from upstream and its repair (nodes and relays)
- :mod:`.assembly`: a node's follow state over the intake (staged hold, reports, deltas)
- :mod:`.receiving`: one archive being received into one buffer (reusing held spans)
- :mod:`.ledger`: what a node tells the hub (states, roll stage, error counts)
- :mod:`.forward`: a relay's forwarding over the intake
- :mod:`.serve`: answering fetches and beating whole releases (hub and relay)
- :mod:`.hub`: the hub's catalog, activations, waves and liveness
- :mod:`.waves`: one staged rollout in waves
- :mod:`.fleet`: the fleet table and the wait-for tally
- :mod:`.broker`, :mod:`.swap`, :mod:`.supervisor`: a node's request routing, swap policy
  and worker supervision
"""

__all__: list[str] = []
