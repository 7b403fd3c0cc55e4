"""Compare speculator variants fast, on cached base-model features
(docs/experiments/an-emb-adapter-on-the-base-embedding-for-the-fourth-default.md): the base
model runs once over the stage-2 rows and the held-out eval rows (hidden states and greedy
choices, kept in --cache), then each variant trains from scratch on them with no base pass
per step.

    .venv/bin/python experiments/cached_features_experiment.py --stage2 runs/branch-s2/stage2 \\
        --eval runs/eval-set/rows-24 --variant adapter --width 576 --steps 700 --log /tmp/adapter.jsonl

Variants: `tied` (the base embedding as it is, as the third default), `adapter`
(`emb_adapter`, any --width) and `deep` (the adapter speculator with a residual MLP block
after each stage, m -> --block-width -> m, shared by the stages, its output started at zero
so it starts as the adapter speculator) and `context` (the adapter speculator whose first
stage also reads the base state one position earlier, through a d -> d map started at zero:
h_t + W h_(t-1); a decoder would keep that state too) and `attend` (the first stage also
reads one attention head over the last --window base states, h_t + O attn(h_t, h_(t-w+1..t)),
with a learned bias per distance and O started at zero: a cheap look at EAGLE's edge) and
`bigram` (the adapter speculator whose token embedding also gets a free learned vector per
token, hashed into --buckets rows, started at zero: what follows a rare token need not be
linear in the base model's embedding of it) and `layers` (the first stage also reads the base
model's states after the --layers given, each through its own d -> d map started at zero,
on their RMS norms: EAGLE-3's fused low, middle and high features). All
seven score the draft vocabulary of the shipped
default and start their heads from the base LM head's rows for it, as `mlpspec train` does.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mlpspec import load_base, load_speculator, speculator_config_for
from mlpspec.base import base_hidden, base_outputs
from mlpspec.data import generated_positions, load_generations, pad_windows
from mlpspec.model import IGNORE_INDEX, MLPSpeculator
from mlpspec.train import SpeculatorObjective, acceptance
from mlpspec.tree import greedy_targets, teacher_forcing

parser = argparse.ArgumentParser()
parser.add_argument("--stage2", type=Path, required=True, help="folder of stage-2 shards (training rows)")
parser.add_argument("--eval", type=Path, required=True, help="folder of greedy eval shards")
parser.add_argument("--cache", type=Path, default=Path("runs/cached-features"))
parser.add_argument("--variant", choices=["tied", "adapter", "deep", "context", "attend", "bigram", "layers"], default="adapter")
parser.add_argument("--block-width", type=int, default=1152)
parser.add_argument("--width", type=int, default=576)
parser.add_argument("--window", type=int, default=32, help="attend: how many base states the head reads")
parser.add_argument("--buckets", type=int, default=8192, help="bigram: rows of the hashed token table")
parser.add_argument("--layers", default="8,16,24", help="layers: the base layers whose outputs the first stage reads")
parser.add_argument("--steps", type=int, default=700)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--rows-per-step", type=int, default=4)
parser.add_argument("--eval-every", type=int, default=100)
parser.add_argument("--log", type=Path, required=True)
args = parser.parse_args()
H = 4
torch.manual_seed(0)
model, tokenizer = load_base(dtype="bfloat16")


def padded_rows(folder: Path):
    """The folder's shards as padded windows [R, n + h + 1], their mask, n and the files."""
    files = sorted(folder.glob("shard-*.pt"))
    rows = load_generations(files)
    n = max(len(r) for r in rows) - H - 1
    windows, valid = pad_windows(rows, n + H + 1, tokenizer.pad_token_id or 0)
    return windows, valid, n, files


def layer_states(folder: Path, layers: list[int]) -> torch.Tensor:
    """The base model's states after each of `layers` [R, n, len(layers) * d] bf16, one cache
    file per layer, so another choice of layers reuses what is kept."""
    paths = {layer: args.cache / f"{folder.name}-layer{layer}.pt" for layer in layers}
    missing = [layer for layer in layers if not paths[layer].is_file()]
    if missing:
        windows, valid, n, _ = padded_rows(folder)
        d = model.config.hidden_size
        parts = []
        for s in range(0, windows.size(0), 16):
            window, mask = windows[s : s + 16, : n + H], valid[s : s + 16, : n + H]
            with torch.no_grad():
                states = base_hidden(model, window, mask.long(), feature_layers=missing)  # b n+h (1+l)d, the final state first
            parts.append(states[:, :n, d:].to(torch.bfloat16))  # b n (l d)
        args.cache.mkdir(parents=True, exist_ok=True)
        for layer, kept in zip(missing, torch.cat(parts).split(d, dim=-1)):
            torch.save(kept.clone(), paths[layer])
    return torch.cat([torch.load(paths[layer]) for layer in layers], dim=-1)  # R n (l d)


def features(folder: Path) -> dict:
    """hidden [R, n, d] bf16, ids [R, n + h], greedy targets [h, R, n] (IGNORE_INDEX where
    the base model did not write the target token)."""
    cached = args.cache / f"{folder.name}.pt"
    if cached.is_file():
        return torch.load(cached)
    windows, valid, n, files = padded_rows(folder)
    written = generated_positions(files, n + H + 1)
    parts = {"hidden": [], "ids": [], "targets": []}
    for s in range(0, len(rows), 16):
        window, mask = windows[s : s + 16], valid[s : s + 16]
        _, ids, _ = teacher_forcing(window, n, H)
        with torch.no_grad():
            hidden, logits = base_outputs(model, window[:, : n + H], mask[:, : n + H].long())
        targets = greedy_targets(logits.argmax(-1), n, H)  # h b n
        scored = torch.stack([written[s : s + 16, i + 2 : i + 2 + n] for i in range(H)])  # h b n
        parts["hidden"].append(hidden[:, :n].to(torch.bfloat16))
        parts["ids"].append(ids)
        parts["targets"].append(torch.where(scored, targets, IGNORE_INDEX))
    out = {"hidden": torch.cat(parts["hidden"]), "ids": torch.cat(parts["ids"]), "targets": torch.cat(parts["targets"], 1)}
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, cached)
    return out


train, held_out = features(args.stage2), features(args.eval)
LAYERS = [int(layer) for layer in args.layers.split(",")]
if args.variant == "layers":  # the extra states ride behind the final one: [R, n, d + l d]
    for part, folder in ((train, args.stage2), (held_out, args.eval)):
        part["hidden"] = torch.cat([part["hidden"], layer_states(folder, LAYERS)], dim=-1)
shipped = load_speculator(dtype=torch.float32, base=model)  # for its draft vocabulary
base = model.float()


class DeepSpeculator(MLPSpeculator):
    """Each stage's state goes on through s + W2 GELU(W1 rms(s)) before its head."""

    def __init__(self, config):
        super().__init__(config)
        m = config.width
        self.block_in = torch.nn.Linear(m, args.block_width, bias=False)
        self.block_out = torch.nn.Linear(args.block_width, m, bias=False)
        torch.nn.init.zeros_(self.block_out.weight)

    def _stage(self, i, state, tokens):
        state = super()._stage(i, state, tokens)  # b n m
        inner = torch.nn.functional.gelu(self.block_in(torch.nn.functional.rms_norm(state, state.shape[-1:])))  # b n w
        return state + self.block_out(inner)  # b n m


class ContextSpeculator(MLPSpeculator):
    """The first stage reads h_t + W h_(t-1): the state one position earlier as well."""

    def __init__(self, config):
        super().__init__(config)
        self.previous = torch.nn.Linear(config.emb_dim, config.emb_dim, bias=False)
        torch.nn.init.zeros_(self.previous.weight)

    def _input_state(self, state):
        earlier = torch.nn.functional.pad(state[:, :-1], (0, 0, 1, 0))  # b n d   h_(t-1), zero before the row
        return super()._input_state(state + self.previous(earlier))  # b n d


class AttendSpeculator(MLPSpeculator):
    """The first stage reads h_t + O attn(h_t, the last --window states): one head of width 128."""

    def __init__(self, config):
        super().__init__(config)
        d, a = config.emb_dim, 128
        self.query, self.key, self.value = (torch.nn.Linear(d, a, bias=False) for _ in range(3))
        self.out = torch.nn.Linear(a, d, bias=False)
        torch.nn.init.zeros_(self.out.weight)
        self.distance_bias = torch.nn.Parameter(torch.zeros(args.window))

    def _input_state(self, state):
        n = state.size(1)
        distance = torch.arange(n).view(n, 1) - torch.arange(n).view(1, n)  # n n   t - s
        seen = (distance >= 0) & (distance < args.window)  # n n
        bias = self.distance_bias[distance.clamp(0, args.window - 1)].masked_fill(~seen, float("-inf"))  # n n
        q, k, v = self.query(state), self.key(state), self.value(state)  # b n a
        weights = (q @ k.transpose(1, 2) / q.size(-1) ** 0.5 + bias).softmax(-1)  # b n n
        return super()._input_state(state + self.out(weights @ v))  # b n d


class BigramSpeculator(MLPSpeculator):
    """Each stage's token embedding plus a learned row for the token (id mod --buckets)."""

    def __init__(self, config):
        super().__init__(config)
        self.table = torch.nn.Embedding(args.buckets, config.width)
        torch.nn.init.zeros_(self.table.weight)

    def token_embedding(self, i, tokens):
        return super().token_embedding(i, tokens) + self.table(tokens % args.buckets)  # b n m


class LayersSpeculator(MLPSpeculator):
    """The first stage reads h_t + sum_l W_l rms(h_t after layer l), for each of --layers."""

    def __init__(self, config):
        super().__init__(config)
        d = config.emb_dim
        self.layer_maps = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in LAYERS)
        for layer_map in self.layer_maps:
            torch.nn.init.zeros_(layer_map.weight)

    def _check_state(self, state, ndim):
        super()._check_state(state[..., : self.config.emb_dim], ndim)

    def _input_state(self, state):
        d = self.config.emb_dim
        final, others = state[..., :d], state[..., d:].split(d, dim=-1)  # b n d, l x (b n d)
        for layer_map, other in zip(self.layer_maps, others):
            final = final + layer_map(torch.nn.functional.rms_norm(other, (d,)))  # b n d
        return super()._input_state(final)  # b n d


adapter = args.variant in ("adapter", "deep", "context", "attend", "bigram", "layers")
variants = {"deep": DeepSpeculator, "context": ContextSpeculator, "attend": AttendSpeculator,
            "bigram": BigramSpeculator, "layers": LayersSpeculator}
speculator = variants.get(args.variant, MLPSpeculator)(speculator_config_for(
    base, n_predict=H, tie_weights=True, tie_base_embeddings=True, draft_vocab_size=8192,
    inner_dim=args.width if adapter else 0, emb_adapter=adapter))
speculator.attach_base(base)
speculator.set_draft_vocab(shipped.draft_vocab.clone(), base=base)
objective = SpeculatorObjective(speculator)
trainable = [p for p in speculator.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)


def evaluate() -> dict:
    """Per-head accuracy, chain acceptance and the top-1 chain's tokens/step, held out."""
    with torch.no_grad():
        _, hits = objective(held_out["hidden"].float(), held_out["ids"], held_out["targets"])
    return acceptance(hits, held_out["targets"])


rows = train["hidden"].size(0)
generator = torch.Generator().manual_seed(0)
order, position = torch.randperm(rows, generator=generator), 0
start = time.perf_counter()
with open(args.log, "w") as log:
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if position + args.rows_per_step > rows:
            order, position = torch.randperm(rows, generator=generator), 0
        batch = order[position : position + args.rows_per_step]
        position += args.rows_per_step
        loss, _ = objective(train["hidden"][batch].float(), train["ids"][batch], train["targets"][:, batch])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % args.eval_every == 0:
            result = evaluate()
            entry = {"step": step, "loss": round(float(loss.detach()), 3), "eval_accuracy": result["accuracy"],
                     "eval_tokens_per_step": result["tokens_per_step"], "seconds": round(time.perf_counter() - start)}
            print(entry, flush=True)
            log.write(json.dumps(entry) + "\n")
