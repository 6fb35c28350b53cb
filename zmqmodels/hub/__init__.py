"""The control plane's processes: the hub (``hub``: sockets and its core; ``desk``: its
store side; ``jobs``: its store executor) and the relay (``relay``)."""

__all__: list[str] = []
