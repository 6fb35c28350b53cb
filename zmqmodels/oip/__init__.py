"""The Open Inference Protocol (KServe v2) in front of a node: ``codec`` (v2 <-> the node's
protocol, no I/O), ``pb`` (the gRPC messages), ``gateway`` (the HTTP and gRPC servers)."""

__all__: list[str] = []
