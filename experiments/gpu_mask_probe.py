"""Why a 2-node tree costs 2.8x a 1-node forward at batch 16 and 2048 context on a GPU
(docs/experiments/on-a-gpu-the-verify-cost-curve-of-a-1b-model-and-projected-s.md): time scaled-dot-product attention alone, at the 1B model's
shape, with the masks a tree verification could pass.

    python experiments/gpu_mask_probe.py [--device cuda]

Prints kernel-time medians (ms) for q query tokens per row over L + q keys, for an
additive float mask as the decoder builds it, the same mask in storage whose rows are
padded to a multiple of 16 (aligned strides), a boolean mask, and no mask; then the float
mask with only the memory-efficient kernel allowed, and with only the math one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, device: torch.device, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tick) * 1e3)
    return statistics.median(times)


def masks(allowed: torch.Tensor, dtype: torch.dtype) -> dict:
    """allowed [b, 1, q, S] bool -> the mask forms to compare."""
    b, _, q, S = allowed.shape
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    padded = torch.full((b, 1, q, -(-S // 16) * 16), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    padded[..., :S] = additive
    return {"float": additive, "float, rows padded to 16": padded[..., :S], "bool": allowed, "none": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    heads, head_dim = (4, 16) if args.tiny else (32, 64)
    print("kernel ms per attention call (one layer); q new tokens per row after L context tokens")
    for b, L in ((1, 2048), (16, 512), (16, 2048)):
        for q in (1, 2, 8):
            S = L + q
            query = torch.randn(b, heads, q, head_dim, device=device, dtype=dtype)
            key = torch.randn(b, heads, S, head_dim, device=device, dtype=dtype)  # kv heads already repeated, as HF's sdpa path does
            value = torch.randn_like(key)
            allowed = torch.ones(b, 1, q, S, dtype=torch.bool, device=device)
            allowed[..., L:] = torch.ones(q, q, dtype=torch.bool, device=device).tril()  # a chain: each node sees those above it
            cells = []
            forms = masks(allowed, dtype)
            for name, mask in forms.items():
                ms = median_ms(lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask), device)
                cells.append(f"{name} {ms:.3f}")
            for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):  # which one the float mask gets
                with sdpa_kernel(backend):
                    try:
                        ms = median_ms(lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=forms["float"]),
                                       device)
                        cells.append(f"float, {backend.name} only {ms:.3f}")
                    except RuntimeError:  # this backend cannot take these inputs
                        cells.append(f"float, {backend.name} only n/a")
            print(f"b={b:2d} L={L} q={q}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
