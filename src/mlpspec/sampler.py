"""How each row of a mixed batch picks its tokens (tree.walk's choose): greedy rows take
the argmax, sampled rows draw from their own p_target with their own settings.

A sampled row draws by inverse CDF with a uniform fixed per output position (the
request's `uniforms`): the token at position t is the first whose cumulative p_target
exceeds uniforms[t]. The walk's SpecInfer rule (generate.speculative_generate) keeps a child
that carries the draw and emits the draw otherwise, so what a row emits at position t is
the draw from p_target given exactly the tokens before it: the same token whichever tree
the step checked, whether the row decoded alone or batched. That is what makes a seed
reproducible under continuous batching, and keeps the output distribution the base
model's own (each uniform is used once, at its position).
"""

from __future__ import annotations

import torch

from .decode import target_probs


class RowChooser:
    """choose(logits [b, V], depth) for rows with settings [(temperature, top_k, top_p)]
    per row, uniforms [b, T] and offsets [b] (each row's output position of depth 0)."""

    def __init__(self, settings: list[tuple[float, int | None, float | None]], uniforms: torch.Tensor,
                 offsets: torch.Tensor, record: list[int] = ()):
        """record: rows whose log-softmax at every depth is kept in `recorded` (logprobs)."""
        self.settings, self.uniforms, self.offsets = settings, uniforms, offsets
        self.record = torch.tensor(list(record), dtype=torch.long, device=uniforms.device)
        self.recorded: list[torch.Tensor] = []  # per depth: r V
        groups: dict[tuple, list[int]] = {}
        for row, setting in enumerate(settings):
            if setting[0] > 0:
                groups.setdefault(setting, []).append(row)
        device = uniforms.device
        self.groups = [(setting, torch.tensor(rows, device=device)) for setting, rows in groups.items()]

    def __call__(self, logits: torch.Tensor, depth: int) -> torch.Tensor:
        if self.record.numel():
            self.recorded.append(torch.log_softmax(logits[self.record].float(), dim=-1))  # r V
        token = logits.float().argmax(dim=-1)  # b   the greedy rows' choice
        for (temperature, top_k, top_p), rows in self.groups:
            p_target = target_probs(logits[rows], temperature, top_k, top_p)  # r V
            u = self.uniforms[rows, self.offsets[rows] + depth]  # r
            token[rows] = inverse_cdf(p_target, u)
        return token


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token each row's uniform u [r] in [0, 1) falls on under p [r, V]."""
    cdf = p.double().cumsum(dim=-1)  # r V
    at = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)  # r
    return at.clamp(max=p.size(-1) - 1)
