"""Export a speculator for the serving engines that still run MLP speculators.

- `ibm`: the released format exactly (what TGIS, fms-extras, HF TGI and vLLM v0 read).
- `arctic`: the same tensors with the config Snowflake's ArcticInference plugin for vLLM
  reads (`"method": "arctic"`): its MLP class is chosen by `architectures`, and it serves
  only base models whose first architecture is listed in `base_model_archs`. It honours
  tie_weights and scale_input as the released format defines them, and proposes a chain
  (top-1 per head), ignoring the tree fields.
- `vllm`: the same tensors, for mlpspec's own vLLM plugin (`mlpspec.vllm_drafter`, through
  vLLM's EAGLE proposer): config.json is vLLM's view, a one-layer model with the base
  model's attention shape and hidden size (the proposer sizes its buffers and the drafter's
  KV cache from it), and the released config sits inside it under `mlpspec_speculator`.
  Since the drafter runs mlpspec's own heads, a draft vocabulary is kept (its `draft_vocab`
  tensor maps head rows to token ids).

All three are plain MLP speculators: every tensor stored, every stage reading the sampled
token, and (but for vllm's draft vocabulary) every head over the whole vocabulary. Our
extensions are mapped onto that where the math allows it (embeddings tied to the base
model are materialised, through the emb_adapter where there is one) and refused where it
does not (a speculator without token conditioning, feature layers, a draft vocabulary
outside vllm): a file that loads but proposes different tokens would be worse than no file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MLPSpecError
from .fileio import atomic_folder
from .model import CONFIG_FILE, MLPSpeculator, MLPSpeculatorConfig, save_speculator

FORMATS = ("ibm", "arctic", "vllm")
ARCTIC_ARCHITECTURE = "ArcticMLPSpeculatorPreTrainedModel"
# what vLLM reads of the base model's config to size the drafter's buffers and KV cache
VLLM_BASE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                    "max_position_embeddings", "rms_norm_eps", "intermediate_size")


def check_exportable(config: MLPSpeculatorConfig, fmt: str) -> None:
    """Refuse, in one line, what `fmt` cannot express."""
    if fmt not in FORMATS:
        raise MLPSpecError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if config.draft_vocab_size and fmt != "vllm":  # mlpspec's own drafter runs mlpspec's heads
        raise MLPSpecError(
            f"this speculator's heads score a draft vocabulary of {config.draft_vocab_size} tokens; "
            f"the {fmt} format has full-vocabulary heads only (export --format vllm, or train without "
            f"--draft-vocab-size)"
        )
    if not config.token_conditioning:
        raise MLPSpecError(f"a Medusa-style speculator (no token conditioning) has no {fmt} equivalent")
    if config.feature_layers:
        raise MLPSpecError(
            f"this speculator also reads the base model's layers {config.feature_layers}; the {fmt} format's "
            f"speculators read the final state only (train without --feature-layers to export)"
        )


def export_speculator(speculator: MLPSpeculator, out: str | Path, fmt: str,
                      base_model_name_or_path: str | None = None, base_architectures: list[str] | None = None,
                      base_config: dict | None = None) -> Path:
    """Write `speculator` to `out` in format `fmt`. Tensors tied to the base model must be
    attached (load the speculator with base=...), and are written out in full. The vllm
    format needs the base model's config (`base_config`, its text config as a dict)."""
    cfg = speculator.config
    check_exportable(cfg, fmt)
    base_name = base_model_name_or_path or cfg.base_model_name_or_path
    if not base_name:
        raise MLPSpecError("the export needs the base model's name: pass --base (the config does not record it)")
    if fmt == "arctic" and not base_architectures:
        raise MLPSpecError("the arctic format records the base model's architectures: pass the base model")
    if fmt == "vllm" and not base_config:
        raise MLPSpecError("the vllm format records the base model's attention shape: pass the base model")
    plain = MLPSpeculatorConfig(
        vocab_size=cfg.vocab_size, emb_dim=cfg.emb_dim, inner_dim=cfg.width, n_predict=cfg.n_predict,
        top_k_tokens_per_head=list(cfg.top_k_tokens_per_head), n_candidates=cfg.n_candidates,
        tie_weights=cfg.tie_weights, scale_input=cfg.scale_input, base_model_name_or_path=base_name,
        draft_vocab_size=cfg.draft_vocab_size,  # check_exportable let it through for vllm only
    )
    exported = MLPSpeculator(plain).to(speculator.dtype)
    state = speculator.state_dict()
    if cfg.emb_adapter:  # emb_i = E A_i^T, multiplied out: the released format's [V, m] embeddings
        for i in range(cfg.n_predict):
            state[f"emb.{i}.weight"] = state[f"emb.{i}.weight"] @ state.pop(f"emb_adapter.{i}.weight").T
    missing, unexpected = exported.load_state_dict(state, strict=False)
    if missing or unexpected:  # cannot happen for the configs check_exportable lets through
        raise MLPSpecError(f"export: tensors do not line up (missing {missing}, unexpected {unexpected})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MLPSpecError(f"{out}: already exists and is not empty; choose a new --out")
    with atomic_folder(out) as folder:
        save_speculator(exported, folder)
        if fmt != "ibm":  # the released config, rewritten for the engine that reads it
            config = json.loads((folder / CONFIG_FILE).read_text())
            if fmt == "arctic":
                config["architectures"] = [ARCTIC_ARCHITECTURE]
                config["base_model_archs"] = list(base_architectures)
            else:
                config = vllm_config(config, base_config)
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_for_base(speculator_name: str | None, base_name: str | None, fmt: str, out: str | Path,
                    dtype: str = "float32") -> Path:
    """Load a speculator (folder, hub id, or None for the shipped default) with its base
    model (folder, hub id, or None for the embedded default), check that they fit, and
    export it to `out` in format `fmt`."""
    import torch

    from .base import DEFAULT_BASE_HUB_ID, check_pair, load_base
    from .checkpoint import load_speculator

    model, _ = load_base(base_name, dtype=dtype)
    speculator = load_speculator(speculator_name, dtype=getattr(torch, dtype), base=model)
    check_pair(model, speculator)  # an export for a base it does not fit would fail only when served
    return export_speculator(speculator, out, fmt,
                             base_model_name_or_path=base_name or speculator.config.base_model_name_or_path
                             or DEFAULT_BASE_HUB_ID,
                             base_architectures=list(model.config.architectures or [type(model).__name__]),
                             base_config=model.config.get_text_config().to_dict())


def vllm_config(released: dict, base: dict) -> dict:
    """The config.json vLLM reads for the drafter: a one-layer Llama-type model of the base
    model's shape (never run: the plugin's drafter reads `mlpspec_speculator`, the released config)."""
    shape = {k: base[k] for k in VLLM_BASE_FIELDS if base.get(k) is not None}
    shape.setdefault("head_dim", base["hidden_size"] // base["num_attention_heads"])
    shape.setdefault("num_key_value_heads", base["num_attention_heads"])
    return {"model_type": "llama", "architectures": list(released["architectures"]), "num_hidden_layers": 1, **shape,
            "torch_dtype": released.get("torch_dtype"), "mlpspec_speculator": released}
