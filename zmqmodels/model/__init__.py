"""Where a model runs: the only package (with the node's worker) that imports torch.

Compile and prove parity (``compile``), read sources and checkpoints (``sources``,
``checkpoint``), build releases (``build``, ``weights``), prove batching (``batching``), load
and check a release (``loader``) and hold the serving model (``slot``)."""

__all__: list[str] = []
