"""The I/O plumbing the shells share: the event loop (``ioloop``, ``mailbox``), CURVE
(``curve``), endpoints and socket tuning (``endpoints``, ``tuning``), buffers, the health and
metrics servers (``health``, ``metrics``, ``exporter``)."""

__all__: list[str] = []
