"""Which library multiplies the default base model's linear shapes faster on this CPU at a
few rows: MKL (PyTorch's float32 default) or oneDNN on a prepacked weight (what
`--kernels auto` routes float32 linears to)? Medians of 30 calls, one product at a time,
without the TorchFunctionMode that routes them in a pass.

    .venv/bin/python experiments/linear_kernels.py
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mlpspec.hardware import describe_machine
from mlpspec.kernels import onednn_linear

SHAPES = {"q/o projection 576 -> 576": (576, 576), "gate/up 576 -> 1536": (576, 1536),
          "down 1536 -> 576": (1536, 576), "LM head 576 -> 49152": (576, 49152)}


def median_us(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,16")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps({"machine": describe_machine(), "dtype": "float32"}))
    generator = torch.Generator().manual_seed(0)
    for rows in [int(r) for r in args.rows.split(",")]:
        for name, (d_in, d_out) in SHAPES.items():
            x = torch.randn(rows, d_in, generator=generator)  # rows in
            weight = torch.randn(d_out, d_in, generator=generator)  # out in
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            mkl = median_us(lambda: F.linear(x, weight), args.calls)
            onednn = median_us(lambda: onednn_linear(x, packed, None), args.calls)
            print(json.dumps({"rows": rows, "shape": name, "mkl_us": round(mkl), "onednn_us": round(onednn),
                              "onednn_over_mkl": round(onednn / mkl, 2)}))


if __name__ == "__main__":
    main()
