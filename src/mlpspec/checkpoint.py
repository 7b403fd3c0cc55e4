"""Where speculators come from: a local folder, a Hugging Face hub id, or the default that
ships for the embedded default base model. The released format itself (config.json and
model.safetensors) is read and written in model.py, beside the network it describes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import MLPSpecError, one_line
from .model import CONFIG_FILE, INDEX_FILE, TORCH_WEIGHTS_FILE, MLPSpeculator, load_speculator_folder, read_config

DEFAULT_SPECULATOR = "default_speculator"  # package data folder, filled by training


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
        raise MLPSpecError(f"{repo_id}: not a valid hub id ({one_line(e)})") from None
    except OSError as e:  # huggingface_hub's network and cache errors are OSError subclasses
        raise MLPSpecError(f"{repo_id}: could not fetch from the hub or its local cache ({one_line(e)})") from None
    return Path(folder)
