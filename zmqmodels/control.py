"""Old name of :mod:`zmqmodels.hub_client` (kept so existing imports work)."""

from .hub_client import HubClient

__all__ = ["HubClient"]
