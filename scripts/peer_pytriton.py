"""PyTriton as a peer in benchmarks: a real Triton Inference Server (PyTriton's bundled
tritonserver, its Python backend proxying to this process) serving TorchScript files with one
torch thread and Triton's dynamic batcher. Run by ``scripts/bench_gateway.py`` under its own
virtual environment (PyTriton pins numpy < 2):

    .venv-pytriton/bin/python scripts/peer_pytriton.py --http P --grpc P --metrics P \\
        --model mlp=/path/mlp.pt:784 [--model ...] [--max-batch 32] [--delay-us 200]

Inputs are ``INPUT__0`` [-1, WIDTH] FP32, outputs ``OUTPUT__0`` (the names Triton's PyTorch
backend uses, as the zmqmodels gateway does), so one client serves both. Prints ``ready`` once
every model answers; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main() -> None:
    import numpy as np
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--http", type=int, required=True)
    ap.add_argument("--grpc", type=int, required=True)
    ap.add_argument("--metrics", type=int, required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH:WIDTH")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--delay-us", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = TritonConfig(http_port=args.http, grpc_port=args.grpc, metrics_port=args.metrics)
    with Triton(config=config) as triton:
        for spec in args.model:
            name, rest = spec.split("=", 1)
            path, width = rest.rsplit(":", 1)
            module = torch.jit.load(path).eval()
            with torch.inference_mode():
                out_width = module(torch.zeros(1, int(width))).shape[1]

            def infer(module=module):  # noqa: ANN202
                @batch
                def fn(INPUT__0):  # noqa: N803 (the tensor's name)
                    with torch.inference_mode():
                        return {"OUTPUT__0": module(torch.from_numpy(INPUT__0)).numpy()}
                return fn

            triton.bind(model_name=name, infer_func=infer(),
                        inputs=[Tensor(name="INPUT__0", dtype=np.float32, shape=(int(width),))],
                        outputs=[Tensor(name="OUTPUT__0", dtype=np.float32, shape=(out_width,))],
                        config=ModelConfig(max_batch_size=args.max_batch,
                                           batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us)))
        triton.run()
        print("ready", flush=True)
        stop.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
