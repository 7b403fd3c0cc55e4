"""Faster CPU matmuls for the base model's linear layers, without touching the model.

PyTorch's CPU build sends a float32 `F.linear` to MKL, whose small-M sgemm is slow on AMD
CPUs: on a 2-core AMD EPYC, a [16, 576] x [576, 1536] product took 250 us in MKL and 165 us
in oneDNN with the weight prepacked for it; the 49152 x 576 LM head over 16 rows 17-19 ms
against 6-10 ms. oneDNN (PyTorch's other CPU matmul library, the one inductor's weight
prepacking calls) does the same arithmetic in its own blocked layout, so every tree node
costs less, and the one-token pass too (the head over one row: 10 ms against 4 ms).

`PackedLinears(model)` packs every linear weight of the model once (a second copy of them,
in oneDNN's layout) and, used as a context manager, routes each `F.linear` on those
weights to oneDNN: a TorchFunctionMode, so the model's modules, attributes and forward
stay as transformers wrote them. Linears it did not pack (GPT-2's Conv1D is no linear),
other dtypes and other devices run as before. The results differ from MKL's by float
rounding (a different summation order), as MKL's own M=1 and M=16 kernels differ.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import MLPSpecError


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """Whether this build and CPU prepack weights of `dtype` for oneDNN (bfloat16 needs
    AVX512-BW/VL/DQ or AVX-NE-CONVERT; ONEDNN_MAX_CPU_ISA=AVX2 takes that away)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        out = onednn_linear(torch.ones(1, 8, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype)),
                            None)
    except RuntimeError:
        return False
    return bool((out == 8).all())


# A pass of SmolLM2-135M over q tokens (a 2-core AMD EPYC held to AVX2 kernels, bfloat16,
# ms): PyTorch's kernels q = 1 / 2 / 4 / 8 / 16: 28 / 32 / 47 / 78 / 145; its weights read
# in float32 by oneDNN 29 / 55 / 59 / 66 / 78. The float32 copy is twice the bytes to read,
# and pays from about 8 rows on.
WIDEN_FROM_ROWS = 8


def packing_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype oneDNN computes `dtype` weights in here: their own where it packs them;
    float32 for bfloat16 ones where it packs only float32 (AVX2: products of bfloat16 numbers
    are exact in float32, and a bfloat16 matmul sums them in float32 too, so only the order of
    the sums differs); None where it packs neither."""
    if can_pack(dtype):
        return dtype
    if dtype == torch.bfloat16 and can_pack(torch.float32):
        return torch.float32
    return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [.., in] times a weight packed by _reorder_linear_weight, plus bias: [.., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinears(TorchFunctionMode):
    """A model's linear weights prepacked for oneDNN, used inside `with packed:`.

    A bfloat16 weight that oneDNN packs only in float32 (packing_dtype) is read in float32
    from WIDEN_FROM_ROWS rows on (a tree), where PyTorch's own bfloat16 matmul emulates
    bfloat16 slowly, and left to PyTorch below that, whose kernels read the bfloat16 weight
    at half the memory traffic."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        # id(weight) -> (weight, packed weight, whether one row stays with PyTorch)
        self.packed: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
            weights.append(head.weight)  # tied to the input embedding, still read through F.linear
        for weight in weights:
            into = packing_dtype(weight.dtype) if weight.device.type == "cpu" and weight.dim() == 2 else None
            if into is not None and id(weight) not in self.packed:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(into))
                self.packed[id(weight)] = (weight, packed, into != weight.dtype)

    def __len__(self) -> int:
        return len(self.packed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            entry = self.packed.get(id(weight))
            if (entry is not None and entry[0] is weight and x.dtype == weight.dtype and x.device.type == "cpu"
                    and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
                _, packed, widened = entry
                if not widened:
                    return onednn_linear(x, packed, bias)
                if x.numel() >= WIDEN_FROM_ROWS * x.size(-1):
                    return onednn_linear(x.float(), packed, bias.float() if bias is not None else None).to(x.dtype)
        return func(*args, **kwargs)


KERNELS = ("auto", "onednn", "aten")

# model -> its PackedLinears, kept while the model lives: derived from the weights, like a
# cache, and never stored on the model itself
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_kernels(model: torch.nn.Module, kernels: str = "auto") -> str:
    """Choose the CPU matmul path for `model`'s forward passes through base.run_base:
    "onednn" packs its linear weights for oneDNN (a second copy of them), "aten" leaves
    PyTorch's own choice, "auto" is "onednn" where the weights are on the CPU and oneDNN
    packs their dtype here, else "aten". Returns the path taken."""
    if kernels not in KERNELS:
        raise MLPSpecError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    _PACKED.pop(model, None)
    weight = next(model.parameters())
    packable = weight.device.type == "cpu" and packing_dtype(weight.dtype) is not None
    if kernels == "onednn" and not packable:
        raise MLPSpecError(f"oneDNN cannot pack {str(weight.dtype).removeprefix('torch.')} weights on "
                           f"{weight.device} here; use kernels 'aten' or 'auto'")
    if kernels == "aten" or not packable:
        return "aten"
    _PACKED[model] = PackedLinears(model)
    return "onednn"


def kernels_of(model: torch.nn.Module) -> str:
    """The CPU matmul path use_kernels took for `model`: "onednn" or "aten"."""
    return "onednn" if _PACKED.get(model) else "aten"


def kernels_for(model: torch.nn.Module):
    """The context a forward pass of `model` runs in: its packed linears, or nothing."""
    return _PACKED.get(model) or contextlib.nullcontext()
