"""vLLM's general-plugin entry point (`vllm.general_plugins`): registers the MLP speculator
drafter by name, without importing vLLM's model code until vLLM asks for it."""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    # the folder's own name is checked against the registry before the EAGLE path renames it
    for name in ("MLPSpeculatorPreTrainedModel", "EagleMLPSpeculatorPreTrainedModel"):
        ModelRegistry.register_model(name, "mlpspec.vllm_drafter:EagleMLPSpeculator")
