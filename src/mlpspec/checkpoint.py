"""Reading and writing speculators in the released format (the one vLLM v0, TGIS and
fms-extras read): a folder with config.json and model.safetensors (or a sharded index),
tensor names prefixed with `speculator.`.

Everything that can go wrong with a folder on disk (missing, corrupt, unknown keys, a
tensor of the wrong shape) raises MLPSpecError with one line that names the culprit.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import MLPSpecError
from .fileio import atomic_write
from .model import MLPSpeculator, MLPSpeculatorConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
PREFIX = "speculator."
DEFAULT_SPECULATOR = "default_speculator"  # package data folder, filled by training


def save_speculator(model: MLPSpeculator, path: str | Path) -> None:
    """Write config.json + model.safetensors. Tied tensors are stored once, under the
    lowest index (emb.0, head.0, ln.0, proj.1), as Hugging Face's own writer does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base_tied = model.base_tied_names()
    tensors = {
        PREFIX + name: p.detach().contiguous() for name, p in model.named_parameters() if name not in base_tied
    }
    tensors.update({PREFIX + name: b.detach().contiguous() for name, b in model.named_buffers()})
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    # Weights first, then config: a kill in between leaves a config that the new weights'
    # shape check can still catch, never a config that describes weights not yet written.
    atomic_write(path / WEIGHTS_FILE, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_FILE, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    # A stale sharded index beside the new single file would make the folder ambiguous.
    (path / INDEX_FILE).unlink(missing_ok=True)


def read_config(path: str | Path) -> MLPSpeculatorConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise MLPSpecError(f"{file}: no such file (a speculator folder needs {CONFIG_FILE})")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MLPSpecError(f"{file}: not valid JSON ({_one_line(e)})") from None
    try:
        return MLPSpeculatorConfig.from_dict(raw)
    except MLPSpecError as e:
        raise MLPSpecError(f"{file}: {e}") from None
    except TypeError as e:  # a field of the wrong JSON type reaching arithmetic
        raise MLPSpecError(f"{file}: {_one_line(e)}") from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a speculator folder: single safetensors file, sharded index, or
    (for older uploads) a single pytorch_model.bin."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return _load_safetensors(path / WEIGHTS_FILE)
    if (path / INDEX_FILE).is_file():
        return _load_sharded(path / INDEX_FILE)
    if (path / TORCH_WEIGHTS_FILE).is_file():
        file = path / TORCH_WEIGHTS_FILE
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many unrelated types for a bad file
            raise MLPSpecError(f"{file}: not a readable torch checkpoint ({_one_line(e)})") from None
    raise MLPSpecError(f"{path}: no {WEIGHTS_FILE}, {INDEX_FILE} or {TORCH_WEIGHTS_FILE} in this folder")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise MLPSpecError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None


def _load_sharded(index_file: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise MLPSpecError(f"{index_file}: not a valid safetensors index ({_one_line(e)})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = index_file.parent / shard
        if not shard_file.is_file():
            raise MLPSpecError(f"{shard_file}: shard listed in {index_file.name} is missing")
        shard_tensors = _load_safetensors(shard_file)
        tensors.update({name: t for name, t in shard_tensors.items() if weight_map.get(name) == shard})
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise MLPSpecError(f"{index_file}: tensor {missing[0]} is listed but not in its shard")
    return tensors


def load_speculator_folder(path: str | Path, dtype: torch.dtype | None = None, base=None) -> MLPSpeculator:
    """Read a speculator folder. A speculator made with tie_base_embeddings also needs
    `base`, the model whose embedding and LM head it shares. Given a base, it lands on the
    base's device."""
    path = Path(path)
    if not path.is_dir():
        raise MLPSpecError(f"{path}: no such speculator folder")
    return speculator_from(read_config(path), read_tensors(path), path, dtype, base)


def speculator_from(config: MLPSpeculatorConfig, tensors: dict[str, torch.Tensor], path: str | Path,
                    dtype: torch.dtype | None = None, base=None) -> MLPSpeculator:
    """A speculator of this config holding these tensors (named as in a speculator folder,
    `path` naming where they came from in errors), every one checked against the config."""
    path = Path(path)
    # Build on the meta device: initialising weights that are about to be overwritten
    # costs seconds for a full-vocab speculator.
    with torch.device("meta"):
        model = MLPSpeculator(config)
    state = _match_tensors(model, tensors, path)
    if dtype is None:
        dtype = state["proj.0.weight"].dtype
    buffers = dict(model.named_buffers())  # token ids keep their integer type
    state = {name: t if name in buffers else t.to(dtype) for name, t in state.items()}
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    assert set(missing) == model.base_tied_names(), missing  # _match_tensors checked the rest
    model.share_tied_parameters()  # assign gave each tied name its own Parameter
    if model.config.tie_base_embeddings:
        if base is None:
            raise MLPSpecError(f"{path}: this speculator shares the base model's embeddings; pass the base model")
        model.attach_base(base)
    if base is not None:
        model.to(next(base.parameters()).device)
    return model.eval()


def _match_tensors(model: MLPSpeculator, tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    """Map the file's tensors onto the model's parameter names, checking every shape.

    A tied checkpoint may hold a shared tensor once or under every name; where it holds
    several copies they must agree, or tying would silently pick one.
    """
    named = {}
    for name, t in tensors.items():
        key = name.removeprefix(PREFIX)
        if key in named:
            raise MLPSpecError(f"{path}: tensor {key} appears both with and without the {PREFIX!r} prefix")
        named[key] = t
    base_tied = model.base_tied_names()
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=False) if n not in base_tied}
    expected.update(model.named_buffers())
    groups: dict[int, list[str]] = {}  # one group of names per distinct parameter
    for name, p in expected.items():
        groups.setdefault(id(p), []).append(name)

    state = {}
    for names in groups.values():
        present = [n for n in names if n in named]
        if not present:
            raise MLPSpecError(f"{path}: missing tensor {PREFIX}{names[0]}")
        for n in present:
            shape = tuple(expected[n].shape)
            if tuple(named[n].shape) != shape:
                raise MLPSpecError(
                    f"{path}: tensor {PREFIX}{n} has shape {list(named[n].shape)}, "
                    f"the config asks for {list(shape)}"
                )
            if not torch.equal(named[n], named[present[0]]):
                raise MLPSpecError(
                    f"{path}: tie_weights is set but {PREFIX}{n} differs from {PREFIX}{present[0]}"
                )
        for n in names:
            state[n] = named[present[0]]
    unexpected = sorted(set(named) - set(expected))
    if unexpected:
        raise MLPSpecError(f"{path}: unexpected tensor {PREFIX}{unexpected[0]} for this config")
    return state


def load_speculator(
    name_or_path: str | Path | None = None, dtype: torch.dtype | None = None, base=None
) -> MLPSpeculator:
    """Load a speculator from a local folder or a Hugging Face hub id.

    With no argument, load the default speculator shipped for the embedded default base
    model (SmolLM2-135M-Instruct). `base` is needed for speculators that share the base
    model's embeddings (tie_base_embeddings).
    """
    if name_or_path is None:
        folder = default_speculator_folder()
        if not (folder / CONFIG_FILE).is_file():
            raise MLPSpecError(
                "no trained default speculator ships with this version of mlpspec yet; "
                "pass the folder of a speculator to load"
            )
        if base is None and read_config(folder).tie_base_embeddings:
            from .base import load_base  # the default shares the default base's embeddings

            base, _ = load_base(dtype=dtype or torch.float32)
        return load_speculator_folder(folder, dtype=dtype, base=base)
    if Path(name_or_path).is_dir():
        return load_speculator_folder(name_or_path, dtype=dtype, base=base)
    return load_speculator_folder(_download(str(name_or_path)), dtype=dtype, base=base)


def default_speculator_folder() -> Path:
    """Where the default speculator for the embedded default base model ships."""
    return Path(str(resources.files("mlpspec") / DEFAULT_SPECULATOR))


def _download(repo_id: str) -> Path:
    """Fetch a hub repository's speculator files (or find them in the local hub cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise MLPSpecError(f"{repo_id}: no such folder, and not a hub id of the form org/name")
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=[CONFIG_FILE, "*.safetensors", INDEX_FILE, TORCH_WEIGHTS_FILE]
        )
    except HFValidationError as e:
        raise MLPSpecError(f"{repo_id}: not a valid hub id ({_one_line(e)})") from None
    except OSError as e:  # huggingface_hub's network and cache errors are OSError subclasses
        raise MLPSpecError(f"{repo_id}: could not fetch from the hub or its local cache ({_one_line(e)})") from None
    return Path(folder)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
