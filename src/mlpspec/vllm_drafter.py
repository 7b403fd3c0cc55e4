"""An MLP speculator as a drafter in vLLM's V1 engine, through its EAGLE proposer.

Imported by vLLM only (the plugin registers it by name): it needs vLLM installed. The first
call of each proposal runs the speculator's whole top-1 chain, exactly as
MLPSpeculator.propose does, and returns it packed in the fed-back state (chain_state);
later calls move the packed index on. docs/vllm-plugin.md has the design.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import vllm
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention

from .chain_state import advance, is_packed, one_hot_logits, pack
from .errors import MLPSpecError
from .model import MLPSpeculator, MLPSpeculatorConfig, check_fits, speculator_from
from .vllm_plugin import check_vllm_version

class EagleMLPSpeculator(nn.Module):
    has_own_embed_tokens = True
    has_own_lm_head = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        check_vllm_version(vllm.__version__)
        spec = vllm_config.speculative_config
        self.folder = folder = Path(spec.draft_model_config.model)
        # the folder's config.json is vLLM's view (a one-layer model of the target's shape);
        # the speculator's own config sits inside it
        released = getattr(spec.draft_model_config.hf_config, "mlpspec_speculator", None)
        if released is None:
            raise MLPSpecError(f"{folder}: not a folder for mlpspec's vLLM drafter "
                               f"(write one with mlpspec export --format vllm)")
        self.config = MLPSpeculatorConfig.from_dict(dict(released))
        target = vllm_config.model_config.hf_text_config
        check_fits(self.config, target.hidden_size, target.vocab_size, target.num_hidden_layers)
        if self.config.feature_layers:  # the EAGLE path passes the target's final states only
            raise MLPSpecError(f"{folder}: a speculator that reads the base model's layers "
                               f"{self.config.feature_layers} cannot draft in vLLM")
        if spec.num_speculative_tokens > self.config.n_predict:
            raise MLPSpecError(f"{folder}: this speculator drafts {self.config.n_predict} tokens at most, "
                               f"num_speculative_tokens is {spec.num_speculative_tokens}")
        self.speculator = MLPSpeculator(self.config)
        # the proposer looks for these, and shares the target's own in their place otherwise
        self.model = nn.Module()
        self.model.embed_tokens = self.speculator.emb[0]
        self.lm_head = self.speculator.head[0]
        # The proposer wants the drafting layers in one KV-cache group: one attention layer
        # of the target's KV shape, never called (about 3% of the KV capacity for SmolLM2)
        # per tensor-parallel rank, as the target's own layers count them
        ranks = get_tensor_model_parallel_world_size()
        head_dim = getattr(target, "head_dim", None) or target.hidden_size // target.num_attention_heads
        self.kv_group = Attention(target.num_attention_heads // ranks, head_dim, head_dim**-0.5,
                                  num_kv_heads=max(1, target.num_key_value_heads // ranks),
                                  cache_config=vllm_config.cache_config,
                                  # vLLM reads a layer's index from its name: the one after the target's
                                  prefix=f"drafter.layers.{target.num_hidden_layers}.attn")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [n, d]: the target's states (a proposal's first call) or packed
        chains (later calls); input_ids [n]: the token each state produced. Returns the
        packed rows twice: the proposer samples from the first and feeds back the second."""
        packed = is_packed(hidden_states)  # n
        if bool(packed.all()):
            rows = advance(hidden_states)
        else:
            depth = self.config.n_predict
            chains, _ = self.speculator.propose(hidden_states.unsqueeze(1).to(self.speculator.dtype),
                                                input_ids.long().unsqueeze(1), [1] * depth, 1)  # n 1 D
            fresh = pack(chains[:, 0], hidden_states.size(-1), hidden_states.dtype)  # n d
            rows = torch.where(packed.unsqueeze(1), advance(hidden_states), fresh)
        return rows, rows

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return one_hot_logits(hidden_states, self.config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The folder's tensors, checked against the config as mlpspec checks a speculator
        folder (missing, unexpected and tied tensors: one line each)."""
        read = speculator_from(self.config, dict(weights), self.folder, dtype=self.speculator.dtype)
        self.speculator.load_state_dict(read.state_dict())
        return {name for name, _ in self.named_parameters()}
