"""Old name of :mod:`zmqmodels.mailbox` (kept so existing imports work)."""

from .mailbox import Commands, Mailbox

__all__ = ["Commands", "Mailbox"]
