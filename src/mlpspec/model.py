"""The MLP speculator of Wertheimer et al. 2024 (arXiv 2404.19124), exactly as its
authors built it (foundation-model-stack/fms-extras), plus its typed config.

Notation used in the shape comments:
    b batch, n positions, k candidates (tree branches), h heads/stages,
    d base hidden size (emb_dim), m speculator width (inner_dim), V vocabulary,
    l the base layers the first stage also reads (feature_layers).

One stage i, given the running state s and the token t sampled just before:

    s = GELU( ln_i( state_weight * proj_i(s) + emb_scale * emb_i(t) ) )
    logits_i = head_i(s)

with state_weight = 0.5 ** (0.5 / h) and emb_scale = sqrt(1 - state_weight**2) * sqrt(m / 2).
This is the authors' arrangement. vLLM (and REFERENCE.md) write the same stage as
ln_i(proj_i(s) + (emb_weight / state_weight) * emb_i(t)) with emb_weight = emb_scale; the two
differ only by a constant factor inside an RMS norm, i.e. by where the 1e-6 epsilon lands.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import MLPSpecError, one_line
from .fileio import atomic_write
from .tree import best_paths

NORM_EPS = 1e-6
IGNORE_INDEX = -100  # a target that carries no loss (torch's cross_entropy default)
MODEL_TYPE = "mlp_speculator"
ARCHITECTURE = "MLPSpeculatorPreTrainedModel"
# Keys that released config.json files carry for Hugging Face's bookkeeping. They say
# nothing about the model's math, so reading accepts and drops them; any other unknown
# key is an error, because silently ignoring it could serve wrong tokens.
BOOKKEEPING_KEYS = frozenset(
    {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
     "base_model_archs"}  # ArcticInference's record of the base model's architectures
)


def default_top_k(n_predict: int) -> list[int]:
    """The released accelerators' shape: 4 then 3 then 2s ([4, 3, 2, 2] for 4 heads)."""
    return ([4, 3] + [2] * n_predict)[:n_predict]


@dataclass
class MLPSpeculatorConfig:
    vocab_size: int
    emb_dim: int
    inner_dim: int = 0  # 0 means emb_dim, as in the released format
    n_predict: int = 3
    top_k_tokens_per_head: list[int] | None = None  # None: default_top_k(n_predict)
    n_candidates: int | None = None  # None: min(5, size of the tree)
    tie_weights: bool = False
    scale_input: bool = False
    base_model_name_or_path: str | None = None
    # mlpspec's own extensions, not in the released format. tie_base_embeddings: every emb
    # (and, with the full vocabulary, every head) IS the base model's input embedding (LM
    # head), frozen and not stored; export materialises them. draft_vocab_size K > 0: the
    # heads predict only K tokens (the training data's most frequent, stored as the
    # `draft_vocab` buffer), which makes each head V/K times cheaper.
    tie_base_embeddings: bool = False
    draft_vocab_size: int = 0
    # token_conditioning False drops the sampled token from every stage: a Medusa-style,
    # context-vector-only speculator of the same shape, for the paper's first claim.
    token_conditioning: bool = True
    # emb_adapter (with tie_base_embeddings): each stage reads the frozen base embedding
    # through a learned d -> m map, emb_i(t) = emb_adapter_i(E[t]). The base embedding's
    # geometry serves the base model's first layer, not a speculator stage; this map lets the
    # speculator re-aim it (and have its own width m) for m*d parameters, not V*m.
    # Export multiplies it out into ordinary emb tensors.
    emb_adapter: bool = False
    # feature_layers: the first stage also reads the base model's states after these layers
    # (0 is the embedding output), each RMS-normed through its own d -> d map and added to
    # the final state: s_0 = h + sum_l W_l rms(h_l). The final state is what the base model
    # made to predict ONE token; its middle layers say more of what follows (EAGLE-3's fused
    # features). The maps start at zero, so a speculator gains them without changing.
    feature_layers: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("vocab_size", "emb_dim", "n_predict"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("inner_dim", self.inner_dim, minimum=0)
        _check_int("draft_vocab_size", self.draft_vocab_size, minimum=0)
        if self.draft_vocab_size >= self.vocab_size:  # a draft vocabulary of every token is none: 0 says so
            raise MLPSpecError(f"draft_vocab_size {self.draft_vocab_size} must be below vocab_size "
                               f"{self.vocab_size} (0: the heads score the whole vocabulary)")
        for name in ("tie_weights", "scale_input", "tie_base_embeddings", "token_conditioning", "emb_adapter"):
            if not isinstance(getattr(self, name), bool):
                raise MLPSpecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.top_k_tokens_per_head is None:
            self.top_k_tokens_per_head = default_top_k(self.n_predict)
        self.top_k_tokens_per_head = list(self.top_k_tokens_per_head)
        if self.n_candidates is None:
            self.n_candidates = min(5, math.prod(self.top_k_tokens_per_head))
        check_tree_shape(self.top_k_tokens_per_head, self.n_candidates, self.n_predict, self.head_size)
        if self.tie_weights and self.n_predict < 2:
            raise MLPSpecError("tie_weights needs n_predict > 1: there is nothing to tie with one head")
        if self.emb_adapter and not self.tie_base_embeddings:
            raise MLPSpecError("emb_adapter maps the base model's embedding: it needs tie_base_embeddings")
        if self.tie_base_embeddings and not self.emb_adapter and self.inner_dim not in (0, self.emb_dim):
            raise MLPSpecError(
                "tie_base_embeddings needs inner_dim == emb_dim (the base embedding's width), or emb_adapter"
            )
        if self.tie_base_embeddings and not self.draft_vocab_size and self.inner_dim not in (0, self.emb_dim):
            raise MLPSpecError("heads tied to the base LM head read width emb_dim: inner_dim must equal it")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise MLPSpecError("base_model_name_or_path must be a string")
        if not isinstance(self.feature_layers, (list, tuple)):
            raise MLPSpecError(f"feature_layers must be a list of layer numbers, got {self.feature_layers!r}")
        self.feature_layers = list(self.feature_layers)
        for layer in self.feature_layers:
            _check_int("each of feature_layers", layer, minimum=0)
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise MLPSpecError(f"feature_layers names a layer twice: {self.feature_layers}")

    @property
    def head_size(self) -> int:
        """How many tokens each head scores: the draft vocabulary, else the whole vocabulary."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def width(self) -> int:
        """The speculator's inner width m (inner_dim, where 0 means emb_dim)."""
        return self.inner_dim or self.emb_dim

    @property
    def input_width(self) -> int:
        """The width of the state the speculator reads: the final base state, then the
        states after each of feature_layers, (1 + l) * d."""
        return (1 + len(self.feature_layers)) * self.emb_dim

    def to_dict(self) -> dict:
        """The released config.json fields (torch_dtype is added by the writer)."""
        out = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **asdict(self)}
        # optional keys are written only when set, so plain checkpoints are exactly the released format
        for key in ("base_model_name_or_path", "tie_base_embeddings", "draft_vocab_size", "emb_adapter",
                    "feature_layers"):
            if not out[key]:
                del out[key]
        if out["token_conditioning"]:
            del out["token_conditioning"]
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "MLPSpeculatorConfig":
        if not isinstance(raw, dict):
            raise MLPSpecError(f"a speculator config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise MLPSpecError(f"model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - BOOKKEEPING_KEYS)
        if unknown:
            raise MLPSpecError(f"unknown speculator config keys: {', '.join(unknown)}")
        missing = [name for name in ("vocab_size", "emb_dim") if name not in raw]
        if missing:
            raise MLPSpecError(f"speculator config lacks required keys: {', '.join(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


def check_fits(config: MLPSpeculatorConfig, hidden: int, vocab: int, layers: int) -> None:
    """Refuse a speculator that does not fit a base model of this hidden size, vocabulary
    (as its LM head scores it) and number of layers."""
    if config.emb_dim != hidden:
        raise MLPSpecError(f"speculator emb_dim {config.emb_dim} does not match the base model's hidden size {hidden}")
    if config.vocab_size != vocab:
        raise MLPSpecError(
            f"speculator vocab_size {config.vocab_size} does not match the base model's vocabulary {vocab}"
        )
    beyond = [layer for layer in config.feature_layers if layer >= layers]
    if beyond:
        raise MLPSpecError(
            f"speculator feature_layers {beyond} lie beyond the base model's {layers} layers "
            f"(layer L is the state after L of them, 0 the embedding output; the last one's is the final state)"
        )


def _check_int(name: str, value, minimum: int) -> None:
    # bool is an int subclass; `true` for a size is a typo, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MLPSpecError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_tree_shape(top_k: list[int], n_candidates: int, n_predict: int, vocab_size: int) -> None:
    """Validate a candidate-tree shape: one top-k per head, and no more candidates than leaves."""
    if len(top_k) != n_predict:
        raise MLPSpecError(
            f"top_k_tokens_per_head has {len(top_k)} entries but the speculator has {n_predict} heads"
        )
    for i, k in enumerate(top_k):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
            raise MLPSpecError(f"top_k_tokens_per_head[{i}] must be an integer in 1..{vocab_size}, got {k!r}")
    leaves = math.prod(top_k)
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or not 1 <= n_candidates <= leaves:
        raise MLPSpecError(
            f"n_candidates must be an integer in 1..{leaves} (the tree {top_k} has {leaves} leaves), "
            f"got {n_candidates!r}"
        )


def check_proposal_shape(top_k: list[int], n_candidates: int, n_predict: int, head_size: int) -> None:
    """Validate a tree to propose: one top-k for each of the first 1..n_predict stages (fewer
    entries run fewer stages), and no more candidates than leaves."""
    if not 1 <= len(top_k) <= n_predict:
        raise MLPSpecError(
            f"top_k_tokens_per_head has {len(top_k)} entries but the speculator has {n_predict} heads "
            f"(give 1 to {n_predict}: fewer entries run fewer stages)"
        )
    check_tree_shape(top_k, n_candidates, len(top_k), head_size)


def _rms(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNormShift(nn.Module):
    """RMS norm with a learned scale AND a learned shift; no mean subtraction (not LayerNorm)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.eps) * self.weight + self.bias


class MLPSpeculator(nn.Module):
    def __init__(self, config: MLPSpeculatorConfig):
        super().__init__()
        self.config = config
        h, d, m, V, K = config.n_predict, config.emb_dim, config.width, config.vocab_size, config.head_size
        # Base-tied emb/head get their weights from attach_base(); until then they take no memory.
        base_tied = torch.device("meta") if config.tie_base_embeddings else contextlib.nullcontext()
        with base_tied:
            self.emb = nn.ModuleList([nn.Embedding(V, d if config.emb_adapter else m) for _ in range(h)])
        if config.emb_adapter:
            self.emb_adapter = nn.ModuleList([nn.Linear(d, m, bias=False) for _ in range(h)])
        self.proj = nn.ModuleList([nn.Linear(d if i == 0 else m, m, bias=False) for i in range(h)])
        self.feature_maps = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in config.feature_layers])
        self.ln = nn.ModuleList([RMSNormShift(m) for _ in range(h)])
        with base_tied if K == V else contextlib.nullcontext():  # a draft head is the speculator's own
            self.head = nn.ModuleList([nn.Linear(m, K, bias=False) for _ in range(h)])
        if K < V:
            self.register_buffer("draft_vocab", torch.arange(K))  # K: head index -> token id
        # state_weight**(2h) = 1/2: by the last head the base state still carries half the
        # state's expected magnitude. The embedding fills the rest; sqrt(m/2) undoes the
        # 1/sqrt(m) scale of the embedding init.
        self.state_weight = 0.5 ** (0.5 / h)
        self.emb_scale = math.sqrt(1 - self.state_weight**2) * math.sqrt(m / 2)
        self.share_tied_parameters()
        self.reset_parameters()

    def share_tied_parameters(self) -> None:
        """With tie_weights, point every stage at stage 0's emb/head/ln and every m -> m
        transition at proj[1] (proj[0] reads the base state, width d, so it stays its own).
        Called again after loading, which assigns each name its own Parameter."""
        if not self.config.tie_weights:
            return
        for i in range(1, self.config.n_predict):
            self.emb[i].weight = self.emb[0].weight
            if self.config.emb_adapter:
                self.emb_adapter[i].weight = self.emb_adapter[0].weight
            self.head[i].weight = self.head[0].weight
            self.ln[i].weight = self.ln[0].weight
            self.ln[i].bias = self.ln[0].bias
        for i in range(2, self.config.n_predict):
            self.proj[i].weight = self.proj[1].weight

    @property
    def emb_weight(self) -> float:
        """REFERENCE's emb_weight, sqrt((1 - state_weight**2) * m / 2)."""
        return self.emb_scale

    def attach_base(self, model) -> None:
        """Point every emb and head at the base model's input embedding and LM head (frozen;
        shared, not copied, when the dtypes agree). Needed once for tie_base_embeddings."""
        if not self.config.tie_base_embeddings:
            raise MLPSpecError("attach_base is for speculators made with tie_base_embeddings")
        shape = (self.config.vocab_size, self.config.emb_dim)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if tuple(emb.shape) != shape or tuple(head.shape) != shape:
            raise MLPSpecError(
                f"base embedding {list(emb.shape)} / LM head {list(head.shape)} do not fit the speculator's {list(shape)}"
            )
        frozen_emb = nn.Parameter(emb.detach().to(self.dtype), requires_grad=False)
        frozen_head = frozen_emb if head is emb else nn.Parameter(head.detach().to(self.dtype), requires_grad=False)
        for i in range(self.config.n_predict):
            self.emb[i].weight = frozen_emb
            if not self.config.draft_vocab_size:
                self.head[i].weight = frozen_head

    def base_tied_names(self) -> set[str]:
        """Parameter names that belong to the base model, not to the speculator's checkpoint."""
        if not self.config.tie_base_embeddings:
            return set()
        kinds = ("emb",) if self.config.draft_vocab_size else ("emb", "head")
        return {f"{kind}.{i}.weight" for kind in kinds for i in range(self.config.n_predict)}

    def set_draft_vocab(self, token_ids: torch.Tensor, base=None) -> None:
        """Fix which K tokens the heads score. With `base`, start each head from the base
        model's LM head rows for those tokens: the base's own output geometry (in the first
        d of m columns, the rest zero, when an emb_adapter makes the speculator wider)."""
        K = self.config.draft_vocab_size
        if not K or token_ids.shape != (K,):
            raise MLPSpecError(f"set_draft_vocab needs {K or 'a draft vocabulary of'} token ids")
        self.draft_vocab.copy_(token_ids)
        if base is not None:
            rows = base.get_output_embeddings().weight.detach()[token_ids.to(base.device)]  # K d
            width = min(rows.size(1), self.config.width)
            with torch.no_grad():
                for head in self.head:
                    head.weight.zero_()
                    head.weight[:, :width] = rows[:, :width].to(head.weight)

    @torch.no_grad()
    def change_draft_vocab(self, token_ids: torch.Tensor, base) -> int:
        """Make a trained speculator's heads score other tokens [K] (e.g. chosen from new
        data), to go on training. A token kept keeps its trained row. A new token starts from
        its base LM head row mapped into the trained rows' geometry: the least-squares linear
        map from the kept tokens' base rows to their trained rows (trained rows drift far
        from the base rows, but stay close to a linear image of them). Returns how many
        tokens are new."""
        K = self.config.draft_vocab_size
        if not K or token_ids.shape != (K,) or token_ids.unique().numel() != K:
            raise MLPSpecError(f"change_draft_vocab needs {K or 'a draft vocabulary of'} distinct token ids")
        new_vocab = token_ids.sort().values.to(self.draft_vocab)  # K
        slot = self.to_head_index(new_vocab)  # K   each token's row now, IGNORE_INDEX for a new one
        kept = slot != IGNORE_INDEX  # K
        if not bool(kept.any()):
            raise MLPSpecError("the new draft vocabulary shares no token with the old one; train it from scratch")
        lm_head = base.get_output_embeddings().weight.detach()  # V d
        base_rows = lm_head[new_vocab.to(lm_head.device)].float().to(new_vocab.device)  # K d
        # with tie_weights every stage holds the same tensor: rewrite each distinct one once
        for weight in {id(head.weight): head.weight for head in self.head}.values():
            trained = weight.detach().float()[slot[kept]]  # n m   the kept tokens' rows
            to_trained = torch.linalg.lstsq(base_rows[kept], trained).solution  # d m
            rows = base_rows @ to_trained  # K m
            rows[kept] = trained
            weight.copy_(rows)
        self.draft_vocab.copy_(new_vocab)
        return int((~kept).sum())

    def to_token_ids(self, head_index: torch.Tensor) -> torch.Tensor:
        """Head output index -> token id (the identity without a draft vocabulary)."""
        return self.draft_vocab[head_index] if self.config.draft_vocab_size else head_index

    def head_columns(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V] -> the columns the heads score [..., K]."""
        return logits.index_select(-1, self.draft_vocab) if self.config.draft_vocab_size else logits

    def to_head_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token id -> head output index; IGNORE_INDEX for tokens outside the draft
        vocabulary (and for IGNORE_INDEX itself)."""
        if not self.config.draft_vocab_size:
            return token_ids
        lookup = torch.full((self.config.vocab_size,), IGNORE_INDEX, dtype=torch.long, device=token_ids.device)
        lookup[self.draft_vocab] = torch.arange(self.config.draft_vocab_size, device=token_ids.device)
        return torch.where(token_ids >= 0, lookup[token_ids.clamp(min=0)], IGNORE_INDEX)

    def reset_parameters(self) -> None:
        std = 1 / math.sqrt(self.config.width)
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)) and not module.weight.is_meta:
                nn.init.trunc_normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNormShift):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.emb_adapter:
            for adapter in self.emb_adapter:
                if not adapter.weight.is_meta:
                    nn.init.eye_(adapter.weight)  # at m == d: the base embedding as it is, a tied speculator
        for feature_map in self.feature_maps:
            nn.init.zeros_(feature_map.weight)  # the final state alone until training says otherwise

    @property
    def dtype(self) -> torch.dtype:
        return self.proj[0].weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts tied tensors once

    def _input_state(self, state: torch.Tensor) -> torch.Tensor:
        """[..., (1 + l) d] -> the first stage's input [..., d]."""
        d = self.config.emb_dim
        final = state[..., :d]  # ... d
        for feature_map, layer_state in zip(self.feature_maps, state[..., d:].split(d, dim=-1)):
            final = final + feature_map(_rms(layer_state))  # ... d
        return _rms(final) / math.sqrt(2) if self.config.scale_input else final

    def token_embedding(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        """Stage i's embedding of the sampled tokens [b, n] -> [b, n, m]."""
        emb = self.emb[i](tokens)  # b n m, or b n d through the adapter
        return self.emb_adapter[i](emb) if self.config.emb_adapter else emb  # b n m

    def _stage(self, i: int, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        state = self.proj[i](state) * self.state_weight  # b n m
        if self.config.token_conditioning:
            state = state + self.token_embedding(i, tokens) * self.emb_scale  # b n m
        return F.gelu(self.ln[i](state))  # b n m

    def forward(self, state: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Training view (teacher forcing).

        state: [b, n, (1 + l) d] base post-norm hidden states at positions 0..n-1, then
               (with feature_layers) the states after each of those layers.
        ids:   [b, n + h] token ids; stage i reads ids[:, i : i + n] as its input tokens
               (so the last id is never read; the shape is the reference's).
        Returns logits [h, b, n, K], K the head size (V without a draft vocabulary).
        """
        states = self.stage_states(state, ids)
        return torch.stack([self.head[i](s) for i, s in enumerate(states)])  # h b n V

    def stage_states(self, state: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        """The forward pass up to the heads: h states [b, n, m]. Training applies each
        head with its loss, so the [h, b, n, V] logits never exist at once."""
        h = self.config.n_predict
        self._check_state(state, ndim=3)
        b, n, _ = state.shape
        _check_ids(ids, "ids")
        if ids.dim() != 2 or ids.shape != (b, n + h):
            raise MLPSpecError(f"ids must have shape [b, n + h] = [{b}, {n + h}], got {list(ids.shape)}")
        state = self._input_state(state)  # b n d
        states = []
        for i in range(h):
            state = self._stage(i, state, ids[:, i : i + n])  # b n m
            states.append(state)
        return states

    @torch.no_grad()
    def propose(
        self,
        state: torch.Tensor,
        last_token: torch.Tensor,
        top_k_tokens_per_head: list[int] | None = None,
        n_candidates: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference view: grow the candidate tree and keep its best leaves.

        state:      [b, 1, (1 + l) d] the base state that produced last_token (and the
                    states after feature_layers behind it).
        last_token: [b, 1] the token just sampled.
        Stage i expands every branch by its top_k[i] tokens; a leaf's score is the sum of its
        per-stage log-probs. A top_k list shorter than n_predict runs only that many stages.
        Returns (candidates [b, k, D] int64, scores [b, k] float32), best first, with
        k = n_candidates and D = len(top_k).
        """
        cfg = self.config
        top_k = list(cfg.top_k_tokens_per_head if top_k_tokens_per_head is None else top_k_tokens_per_head)
        k = cfg.n_candidates if n_candidates is None else n_candidates
        check_proposal_shape(top_k, k, cfg.n_predict, cfg.head_size)
        paths, scores = self.expand(state, last_token, top_k)  # b N D, b N D
        return best_paths(paths, scores[..., -1], k)

    def expand(self, state: torch.Tensor, last_token: torch.Tensor, top_k: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every leaf of the tree that propose grows: paths [b, N, D] and their scores after
        each stage [b, N, D] (summed log-probs), N = prod(top_k), in expansion order. Each
        stage lists a branch's children best first, so path 0 is the top-1 chain, whichever
        leaves score best, and every smaller tree (cut to fewer stages, or narrower) is in here too (sub_paths):
        the decoder learns from both in hindsight."""
        cfg = self.config
        check_proposal_shape(top_k, math.prod(top_k), cfg.n_predict, cfg.head_size)
        self._check_state(state, ndim=3)
        b = state.size(0)
        _check_ids(last_token, "last_token")
        if last_token.shape != (b, 1) or state.size(1) != 1:
            raise MLPSpecError(
                f"propose takes state [b, 1, d] and last_token [b, 1], got {list(state.shape)} "
                f"and {list(last_token.shape)}"
            )

        state = self._input_state(state)  # b 1 d
        tokens = last_token  # b 1
        paths = torch.empty(b, 1, 0, dtype=torch.long, device=state.device)  # b 1 0
        scores = torch.zeros(b, 1, 0, device=state.device)  # b 1 0   after each stage so far
        total = torch.zeros(b, 1, 1, device=state.device)  # b 1 1   after the last stage
        for i, t in enumerate(top_k):
            state = self._stage(i, state, tokens)  # b k m
            logprobs = F.log_softmax(self.head[i](state), dim=-1)  # b k K
            top_logprobs, top_index = logprobs.topk(t, dim=-1)  # b k t
            top_ids = self.to_token_ids(top_index)  # b k t
            # every branch grows t children; flatten (branch, child) into the branch axis
            paths = torch.cat(
                [paths.unsqueeze(2).expand(-1, -1, t, -1), top_ids.unsqueeze(-1)], dim=-1
            ).flatten(1, 2)  # b k*t i+1
            total = total + top_logprobs  # b k t
            scores = torch.cat(
                [scores.unsqueeze(2).expand(-1, -1, t, -1), total.unsqueeze(-1)], dim=-1
            ).flatten(1, 2)  # b k*t i+1
            total = total.flatten(1, 2).unsqueeze(-1)  # b k*t 1
            state = state.unsqueeze(2).expand(-1, -1, t, -1).flatten(1, 2)  # b k*t m
            tokens = top_ids.flatten(1)  # b k*t
        return paths, scores

    def _check_state(self, state: torch.Tensor, ndim: int) -> None:
        if not isinstance(state, torch.Tensor) or not state.is_floating_point():
            raise MLPSpecError(f"state must be a floating-point tensor, got {_describe(state)}")
        if state.dim() != ndim or state.size(-1) != self.config.input_width:
            layers = f", and {len(self.config.feature_layers)} feature layers" if self.config.feature_layers else ""
            raise MLPSpecError(
                f"state must have shape [b, n, {self.config.input_width}] (emb_dim{layers}), got {list(state.shape)}"
            )
        if state.dtype != self.dtype:
            raise MLPSpecError(f"state dtype {state.dtype} does not match the speculator's {self.dtype}")

    def save_pretrained(self, path: str | Path) -> None:
        """Write the released format: config.json + model.safetensors."""
        save_speculator(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, base=None) -> "MLPSpeculator":
        """Read a released-format folder (single file or sharded index). `base` is the
        base model, needed when the speculator shares its embeddings."""
        return load_speculator_folder(path, dtype=dtype, base=base)


def _check_ids(ids, name: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise MLPSpecError(f"{name} must be an int64 or int32 tensor of token ids, got {_describe(ids)}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


# ---- the released format (the one vLLM v0, TGIS and fms-extras read): a folder with
# config.json and model.safetensors (or a sharded index), tensor names prefixed with
# `speculator.`. Everything that can go wrong with a folder on disk (missing, corrupt,
# unknown keys, a tensor of the wrong shape) raises MLPSpecError with one line that
# names the culprit.

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
PREFIX = "speculator."


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
        raise MLPSpecError(f"{file}: not valid JSON ({one_line(e)})") from None
    try:
        return MLPSpeculatorConfig.from_dict(raw)
    except MLPSpecError as e:
        raise MLPSpecError(f"{file}: {e}") from None
    except TypeError as e:  # a field of the wrong JSON type reaching arithmetic
        raise MLPSpecError(f"{file}: {one_line(e)}") from None


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
            raise MLPSpecError(f"{file}: not a readable torch checkpoint ({one_line(e)})") from None
    raise MLPSpecError(f"{path}: no {WEIGHTS_FILE}, {INDEX_FILE} or {TORCH_WEIGHTS_FILE} in this folder")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise MLPSpecError(f"{file}: not a readable safetensors file ({one_line(e)})") from None


def _load_sharded(index_file: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise MLPSpecError(f"{index_file}: not a valid safetensors index ({one_line(e)})") from None
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
