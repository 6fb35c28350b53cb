"""Releases at rest, torch-free: the manifest (``manifest``), the archive's layout and digest
(``archive``), byte patches (``patch``), signatures (``signing``), building on a base
(``rebase``), the hub's store (``store``) and a node's cache (``cache``)."""

__all__: list[str] = []
