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
from dataclasses import dataclass, field

import torch
import torch._inductor.config
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


# Below these many rows a bfloat16 matmul runs on PyTorch's own kernels, with oneDNN off.
# They convert and multiply row by row, but read the weights fastest for one row: a pass
# of SmolLM2-135M over one token took 23.5 ms on them and 39.5 on oneDNN (a 2-core AMD EPYC
# with native bfloat16). Where oneDNN packs bfloat16, from 4 rows on it is oneDNN's: over
# q = 1 / 2 / 3 / 4 / 5 tree nodes a pass took 22.4 / 39.5 / 37.8 / 37.1 / 38.1 ms with one row
# on PyTorch's kernels, 23.0 / 30.4 / 36.2 / 40.8 / 40.7 with three (a chain of one token
# costs 30 ms, not 40, against a plain step's 23). Where
# it packs only float32 (AVX2), the float32 copy is twice the bytes to read and pays from
# about 8 rows: held to AVX2 kernels, q = 1 / 2 / 4 / 8 / 16 tokens took 28 / 32 / 47 / 78 /
# 145 ms on PyTorch's kernels and 29 / 55 / 59 / 66 / 78 on the float32 copy.
OWN_KERNELS_BELOW_ROWS = 4
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


@contextlib.contextmanager
def oneDNN_off():
    """PyTorch's own CPU kernels inside: the switch torch.backends.mkldnn.flags sets, without
    that context manager's other flags and cost (it runs 200 times a pass below)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


class PackedLinears(TorchFunctionMode):
    """A model's linear weights prepacked for oneDNN, used inside `with packed:`.

    A bfloat16 weight goes to PyTorch's own kernels (oneDNN off) for fewer rows than
    OWN_KERNELS_BELOW_ROWS, or WIDEN_FROM_ROWS where oneDNN packs it only in float32
    (packing_dtype): those read it at half float32's bytes, which is what one token's pass
    waits for, but multiply row by row."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        # id(weight) -> (weight, packed weight, whether it was packed in float32, rows below which PyTorch's own run)
        self.packed: dict[int, tuple[torch.Tensor, torch.Tensor, bool, int]] = {}
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
            weights.append(head.weight)  # tied to the input embedding, still read through F.linear
        for weight in weights:
            into = packing_dtype(weight.dtype) if weight.device.type == "cpu" and weight.dim() == 2 else None
            if into is not None and id(weight) not in self.packed:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(into))
                own_below = (WIDEN_FROM_ROWS if into != weight.dtype else OWN_KERNELS_BELOW_ROWS) \
                    if weight.dtype == torch.bfloat16 else 0
                self.packed[id(weight)] = (weight, packed, into != weight.dtype, own_below)
        # a pass over fewer rows sends every packed linear to PyTorch's own kernels, so it
        # need not run under this mode at all: an empty mode made a one-token bfloat16 pass
        # of SmolLM2-135M 32-34 ms where it took 26-28 without (~2170 torch calls a pass,
        # each then through Python)
        self.own_below = min((entry[3] for entry in self.packed.values()), default=0)

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
                _, packed, widened, own_below = entry
                if x.numel() < own_below * x.size(-1):
                    with oneDNN_off():
                        return func(*args, **kwargs)
                if widened:
                    return onednn_linear(x.float(), packed, bias.float() if bias is not None else None).to(x.dtype)
                return onednn_linear(x, packed, bias)
        return func(*args, **kwargs)


KERNELS = ("auto", "onednn", "aten", "compiled")

# Passes over fewer rows than this are "few", the others "many": the two classes of passes
# whose routing through PackedLinears base.route_kernels times against PyTorch's own kernels
# on each machine. On a 2-core Intel Xeon the routing cost more than it saved (a float32
# one-token pass 53.6 ms routed, 36.9 not; a bfloat16 16-node pass 53.8 against 48.1): the
# mode's dispatch on ~210 linears a pass, where MKL is fast; on a 2-core AMD EPYC, whose
# MKL is slow at few rows, it saved (a float32 16-node pass 91 -> 59 ms).
FEW_ROWS = 4


def rows_class(rows: int | None) -> str:
    """"few" for a pass over fewer than FEW_ROWS tokens (all rows of the batch), else
    "many" (also where the count is not known)."""
    return "few" if rows is not None and rows < FEW_ROWS else "many"


def unroute(model: torch.nn.Module, classes) -> None:
    """Run `model`'s passes of these classes ("few", "many") without its packed linears,
    on PyTorch's own kernels."""
    _UNROUTED[model] = frozenset(classes)

# Graphs a compiled forward may build (one per batch size and tree width) before torch
# gives up compiling and runs eagerly; its default, 8, is one batch size's widths.
RECOMPILE_LIMIT = 64


def _forward(model: torch.nn.Module, kwargs: dict):
    return model(**kwargs)


@functools.cache
def _compiled(autotune: bool):
    """`_forward` compiled by inductor for fixed shapes, with the weights frozen into the
    graphs (prepacked for oneDNN, as kernels "onednn" packs them) and, with `autotune`,
    inductor's own C++ GEMMs timed against oneDNN's for each shape: where oneDNN packs only
    float32, they read bfloat16 weights and multiply in float32 for many rows at once."""
    options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"} if autotune else {}
    return torch.compile(_forward, dynamic=False, options=options)


# A pass over one row runs eagerly on a compiled model. Decoding makes none: at batch 1 a
# one-token pass is padded to cache.SMALLEST_TREE_WIDTH nodes, whose graph (LM head
# included) took 20.4 ms where a one-row graph took 24.6 (native bfloat16, 2-core AMD EPYC).
COMPILED_FROM_ROWS = 2


@dataclass
class Compiled:
    """How a model's passes run under kernels "compiled", and the graphs built so far."""

    autotune: bool  # inductor's C++ GEMMs timed in: bfloat16 weights where oneDNN packs none
    own_below: int  # eager passes over fewer rows run on PyTorch's own kernels (PackedLinears.own_below)
    built: set[tuple[int, int, int]] = field(default_factory=set)  # (batch, tree width, cache slots)


def compiling(weight: torch.Tensor) -> Compiled:
    """The compiled path for a model with weights like `weight`. Held to AVX2 kernels the
    autotuned graphs read bfloat16 weights and multiply in float32: 16.6 / 19.5 / 42.5 ms
    over 2 / 4 / 16 rows against 31 / 44 / 84 eager."""
    bfloat16_cpu = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
    return Compiled(bfloat16_cpu and not can_pack(torch.bfloat16), OWN_KERNELS_BELOW_ROWS if bfloat16_cpu else 0)


def compiled_forward(model: torch.nn.Module, **kwargs):
    """One forward pass of `model` (use_kernels "compiled") on its compiled graph for
    these shapes, built on first use: tens of seconds for SmolLM2-135M on 2 CPU cores.
    Tensors go in with fresh strides: the graphs are specialised to their inputs' strides
    too, even along dimensions of size 1, where `contiguous()` keeps whatever they had."""
    kwargs = {k: v.clone(memory_format=torch.contiguous_format) if isinstance(v, torch.Tensor) else v
              for k, v in kwargs.items()}
    compiled = _COMPILING[model]
    mask = kwargs["attention_mask"]  # one tensor, or one per layer type (base.layer_masks), all as wide
    compiled.built.add((*kwargs["input_ids"].shape, (next(iter(mask.values())) if isinstance(mask, dict) else mask).size(-1)))
    # freezing is read before torch.compile's options apply: as an option it froze nothing
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), torch._inductor.config.patch(freezing=True):
        return _compiled(compiled.autotune)(model, kwargs)


# model -> its PackedLinears, kept while the model lives: derived from the weights, like a
# cache, and never stored on the model itself
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> its Compiled, for the models whose tree passes go to compiled_forward
_COMPILING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the classes of passes (rows_class) that run without its PackedLinears (unroute)
_UNROUTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_kernels(model: torch.nn.Module, kernels: str = "auto") -> str:
    """Choose the CPU matmul path for `model`'s forward passes through base.run_base:
    "onednn" packs its linear weights for oneDNN (a second copy of them), "aten" leaves
    PyTorch's own choice, "auto" is "onednn" where the weights are on the CPU and oneDNN
    packs their dtype here, else "aten". "compiled" sends tree passes to compiled_forward
    (on any device), on a static cache (decode.prefill makes one), and the others, the
    prompt's, to "auto"'s kernels: held to AVX2 kernels, a 250-token bfloat16 prompt took
    1446 ms on PyTorch's own and 414 on oneDNN's float32 copy (221 against 251 ms with
    native bfloat16). Returns the path taken."""
    if kernels not in KERNELS:
        raise MLPSpecError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    _PACKED.pop(model, None)
    _COMPILING.pop(model, None)
    _UNROUTED.pop(model, None)
    weight = next(model.parameters())
    packable = weight.device.type == "cpu" and packing_dtype(weight.dtype) is not None
    if kernels == "compiled":
        _COMPILING[model] = compiling(weight)
        if packable:  # the prompt's pass runs eagerly, on "auto"'s kernels
            _PACKED[model] = PackedLinears(model)
        return "compiled"
    if kernels == "onednn" and not packable:
        raise MLPSpecError(f"oneDNN cannot pack {str(weight.dtype).removeprefix('torch.')} weights on "
                           f"{weight.device} here; use kernels 'aten' or 'auto'")
    if kernels == "aten" or not packable:
        return "aten"
    _PACKED[model] = PackedLinears(model)
    return "onednn"


def kernels_of(model: torch.nn.Module) -> str:
    """The matmul path use_kernels took for `model`: "compiled", "onednn" or "aten", or
    "onednn, few rows" / "onednn, many rows" where only that class of passes is routed
    (unroute)."""
    if model in _COMPILING:
        return "compiled"
    if not _PACKED.get(model):
        return "aten"
    routed = {"few", "many"} - _UNROUTED.get(model, frozenset())
    if len(routed) == 2:
        return "onednn"
    return f"onednn, {routed.pop()} rows" if routed else "aten"


def kernels_for(model: torch.nn.Module, rows: int | None = None):
    """The context a forward pass of `model` over `rows` tokens (all rows of the batch; None:
    not known) runs in: its packed linears; PyTorch's own kernels where they take every
    linear of so few rows (PackedLinears.own_below); or nothing."""
    packed = _PACKED.get(model)
    owner = packed or _COMPILING.get(model)  # both know below how many rows PyTorch's own kernels run
    if owner and rows is not None and rows < owner.own_below:
        return oneDNN_off()
    if not packed or rows_class(rows) in _UNROUTED.get(model, ()):
        return contextlib.nullcontext()
    return packed


def graph_built(model: torch.nn.Module, batch: int, width: int, slots: int) -> bool:
    """Whether compiled_forward has run `model` on a pass of this shape (its graph exists)."""
    compiled = _COMPILING.get(model)
    return compiled is not None and (batch, width, slots) in compiled.built


def compiles(model: torch.nn.Module, rows: int) -> bool:
    """Whether a pass of `model` over `rows` tokens, of a shape that recurs, goes to
    compiled_forward."""
    return model in _COMPILING and rows >= COMPILED_FROM_ROWS
