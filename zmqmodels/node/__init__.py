"""A serving node: its front (``node``, ``requests``), the follower that takes releases from
upstream (``follower``), the worker processes (``worker``, ``worker_boot``, ``holdings``, ``host``)
and the subscriber embedded in a caller's process (``embedded``)."""

__all__: list[str] = []
