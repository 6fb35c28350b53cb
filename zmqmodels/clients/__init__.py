"""Clients: inference over REQ/REP (``client``, ``aclient``) and the hub's control
(``hub``: :class:`~zmqmodels.clients.hub.HubClient`)."""

__all__: list[str] = []
