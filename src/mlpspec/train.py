"""The two-stage training recipe, top to bottom (after the authors' fms-fsdp recipe).

Stage 1 aligns the speculator with the base model's input behaviour: windows of text, the
base model's final states over them, the true next tokens as targets. Stage 2 aligns it
with the base model's output behaviour: the base model's own continuations of prompts cut
from the data. The loss is the sum over heads of each head's mean cross-entropy; the base
model stays frozen. One process or many (`torchrun`, DDP over gloo or nccl); `fsdp_base`
shards a base model too big for one device with PyTorch's own FSDP.

Everything needed to resume sits in the output folder: the run's config, checkpoints
written atomically (speculator + optimizer + step), the generated stage-2 shards, and
train_log.jsonl. The data a step reads is a pure function of the step, so a resumed run
ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .base import (base_hidden, base_outputs, cache_dir, check_pair, load_base, resolve_device,
                   speculator_config_for)
from .data import (EpochOrder, Windows, generate_shards, generated_positions, load_generations, pad_windows,
                   split_heldout, tokenized_corpus, write_self_written_prompts)
from .errors import MLPSpecError
from .fileio import atomic_folder
from .model import IGNORE_INDEX, MLPSpeculator
from .text import encode_prompt, read_prompt_file, user_turn_opening
from .tree import greedy_targets, teacher_forcing

RUN_CONFIG = "train_config.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
# What may change between a run and its resumption without making it a different run
# (a run folder may be moved or copied, so `out` is one of them).
CHOICES = {"dtype": ("float32", "bfloat16"), "targets": ("text", "base", "distill")}
SELF_WRITTEN = "self"  # --stage2-prompts self
SELF_WRITTEN_TOKENS = 64  # the longest request the base model may write itself
RESUMABLE_FIELDS = {"out", "resume", "save_every", "log_every", "stage2_steps", "stage1_steps", "progress", "stage2_dir",
                    "device"}


@dataclass
class TrainConfig:
    out: str
    base: str | None = None  # None: the embedded default, SmolLM2-135M-Instruct
    data: list[str] = field(default_factory=lambda: ["default"])
    text_field: str = "text"
    # the speculator
    n_predict: int = 3
    inner_dim: int = 0
    tie_weights: bool = False
    scale_input: bool = False
    tie_base_embeddings: bool = False
    draft_vocab_size: int = 0  # 0: the heads score the whole vocabulary
    token_conditioning: bool = True  # False: a Medusa-style speculator (the context vector only)
    emb_adapter: bool = False  # with tie_base_embeddings: a learned d -> m map on the base embedding
    feature_layers: list[int] = field(default_factory=list)  # base layers the first stage also reads
    init_from: str | None = None  # start from this speculator's weights (a fresh optimizer and schedule)
    # optimisation
    seq_len: int = 256
    batch_size: int = 4  # per process
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    stage1_steps: int = 1000
    stage2_steps: int = 0
    dtype: str = "float32"  # base model dtype; bfloat16 also runs the speculator under autocast
    # "text": the next tokens of the data, as the reference recipe; "base": the base model's
    # own greedy choices over the same text, which is what verification will check;
    # "distill": the base model's whole next-token distribution over the heads' vocabulary
    # (soft targets: the runner-up tokens that a tree's other branches try are trained too)
    targets: str = "text"
    seed: int = 0
    # stage 2 data
    stage2_rows: int = 256
    stage2_prompt_length: int = 64
    stage2_new_tokens: int = 128
    stage2_greedy: bool = False
    stage2_dir: str | None = None  # where the shards live (default OUT/stage2); share it between runs
    # a JSONL prompt file ({"prompt": ...} or {"messages": [...]} lines): stage 2 answers
    # these, the kind of request the speculator will serve, instead of prompts cut from --data
    # "self": chat prompts the base model writes itself (data.self_written_prompts)
    stage2_prompts: str | None = None
    generate_batch_size: int = 16
    # bookkeeping
    save_every: int = 100
    log_every: int = 10
    eval_rows: int = 8
    eval_new_tokens: int = 64
    fsdp_base: bool = False
    # where the base model and the speculator run: "auto" is this process's GPU (cuda:LOCAL_RANK
    # under torchrun) where there is one, else the CPU; or any torch device name
    device: str = "auto"
    resume: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise MLPSpecError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**raw)

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise MLPSpecError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        resolve_device(self.device)  # a bad name fails here, before anything is written

    def same_run(self, other: "TrainConfig") -> bool:
        mine = {k: v for k, v in asdict(self).items() if k not in RESUMABLE_FIELDS}
        theirs = {k: v for k, v in asdict(other).items() if k not in RESUMABLE_FIELDS}
        return mine == theirs


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Stage 1: linear warm-up, then cosine from lr to 0.1 lr. Stage 2: cosine 0.1 to 0.01 lr."""
    s1 = cfg.stage1_steps
    if step < s1:
        warm = min(cfg.warmup_steps, s1)
        if step < warm:
            return cfg.lr * (step + 1) / warm
        progress = (step - warm) / max(1, s1 - warm)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    progress = (step - s1) / max(1, cfg.stage2_steps)
    return cfg.lr * (0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * progress)))


class SpeculatorObjective(torch.nn.Module):
    """The loss as a module, so DDP wraps one forward: the sum over heads of each head's
    mean cross-entropy, plus each head's top-1 hits (for accuracy) on the same positions.
    With `target_logits` [h, b, n, K] the loss is instead the KL divergence from the base
    model's distribution softmax(target_logits) (distillation); `targets` still say which
    positions count and what a hit is."""

    def __init__(self, speculator: MLPSpeculator):
        super().__init__()
        self.speculator = speculator

    def forward(self, hidden, ids, targets, target_logits=None):  # b n d, b n+h, h b n, h b n K
        speculator = self.speculator
        states = speculator.stage_states(hidden, ids)
        loss = hidden.new_zeros((), dtype=torch.float32)
        hits = []
        for i, state in enumerate(states):
            logits = speculator.head[i](state).float()  # b n K
            if target_logits is None:
                # a target outside the draft vocabulary carries no loss, and counts as a miss
                head_targets = speculator.to_head_index(targets[i]).flatten()  # b*n
                counted = (head_targets != IGNORE_INDEX).sum().clamp(min=1)
                loss = loss + F.cross_entropy(logits.flatten(0, 1), head_targets, ignore_index=IGNORE_INDEX,
                                              reduction="sum") / counted
            else:
                scored = targets[i] != IGNORE_INDEX  # b n
                log_p_target = target_logits[i].float().log_softmax(-1)  # b n K
                # KL(p_target || p_draft): the cross-entropy less the target's own entropy, so 0 is a perfect match
                per_position = (log_p_target.exp() * (log_p_target - logits.log_softmax(-1))).sum(-1)  # b n
                loss = loss + per_position[scored].sum() / scored.sum().clamp(min=1)
            hits.append((speculator.to_token_ids(logits.argmax(-1)) == targets[i]).detach())  # b n
        return loss, torch.stack(hits)  # h b n


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _check_out(cfg: TrainConfig) -> int:
    """Refuse to mix runs in one folder; return the step to resume from (0 for new)."""
    out = Path(cfg.out)
    saved = out / RUN_CONFIG
    if not saved.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise MLPSpecError(f"{out}: this folder holds other files; give an empty or new --out")
        return 0
    previous = TrainConfig.from_dict(json.loads(saved.read_text()))
    if not cfg.resume:
        raise MLPSpecError(f"{out}: already holds a training run; pass --resume to continue it, or choose another --out")
    if not cfg.same_run(previous):
        changed = sorted(k for k, v in asdict(cfg).items() if k not in RESUMABLE_FIELDS and asdict(previous)[k] != v)
        raise MLPSpecError(f"{out}: holds a different run (it differs in {', '.join(changed)}); choose another --out")
    latest = latest_checkpoint(out)
    return 0 if latest is None else int(latest.name.split("-")[1])


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / CHECKPOINTS).glob("step-*")) if (out / CHECKPOINTS).is_dir() else []
    return steps[-1] if steps else None


def save_checkpoint(out: Path, step: int, speculator: MLPSpeculator, optimizer, keep: int = 2) -> None:
    with atomic_folder(out / CHECKPOINTS / f"step-{step:07d}") as tmp:
        speculator.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")
    for old in sorted((out / CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _init_from(speculator: MLPSpeculator, path: str, model) -> None:
    """Copy a saved speculator's weights (and draft vocabulary) into a new run's speculator.
    A speculator without feature_layers may start one with them: the new layers' maps
    start at zero, so the new speculator begins as exactly the old one."""
    source = MLPSpeculator.from_pretrained(path, dtype=torch.float32,
                                           base=model if speculator.config.tie_base_embeddings else None)
    ignored = {"base_model_name_or_path"} | ({"feature_layers"} if not source.config.feature_layers else set())
    mine = {k: v for k, v in speculator.config.__dict__.items() if k not in ignored}
    theirs = {k: v for k, v in source.config.__dict__.items() if k not in ignored}
    if mine != theirs:
        changed = sorted(k for k in mine if mine[k] != theirs[k])
        raise MLPSpecError(f"--init-from {path}: its speculator differs from this run's in {', '.join(changed)}")
    speculator.load_state_dict(source.state_dict(), strict=False)


def _stage2_data(cfg: TrainConfig, model, tokenizer, tokens, prompts, chat: bool, rank: int,
                 world: int) -> list[torch.Tensor]:
    """Make (or find, when resuming) the base model's own continuations; each rank makes
    its share of the shards, then everyone reads all of them."""
    out = Path(cfg.stage2_dir) if cfg.stage2_dir else Path(cfg.out) / "stage2"
    n_shards = math.ceil(cfg.stage2_rows / cfg.generate_batch_size)
    collective = cfg.fsdp_base and world > 1  # see train(): all ranks make every shard together
    if cfg.stage2_prompts == SELF_WRITTEN:
        prompts = _self_written(cfg, model, tokenizer, out / "self-prompts.jsonl", rank, world, collective)
    mine = range(n_shards) if collective else range(rank, n_shards, world)
    bar = tqdm(total=n_shards, desc="stage 2 data", disable=not (rank == 0 and cfg.progress))
    generate_shards(model, tokenizer, tokens, out, mine, cfg.generate_batch_size,
                    cfg.stage2_prompt_length, cfg.stage2_new_tokens, temperature=0.0 if cfg.stage2_greedy else 1.0,
                    top_k=10, chat=chat, seed=cfg.seed, write=rank == 0 or not collective,
                    progress=lambda done, total: bar.update(1 if collective else world),
                    prompts=prompts)
    bar.close()
    _barrier()
    return load_generations([out / f"shard-{i:05d}.pt" for i in range(n_shards)])


def _self_written(cfg: TrainConfig, model, tokenizer, file: Path, rank: int, world: int, collective: bool) -> list:
    """--stage2-prompts self: one request per stage-2 row, written by the base model and
    kept in `file`, so a resumed run answers the same ones. The ranks share the sampling;
    with a sharded base (collective) every rank samples every batch with the others."""
    if not file.is_file():
        bar = tqdm(total=cfg.stage2_rows, desc="stage 2 prompts", disable=not (rank == 0 and cfg.progress))
        write_self_written_prompts(file, model, tokenizer, cfg.stage2_rows, write=rank == 0,
                                   batch_size=cfg.generate_batch_size, max_tokens=SELF_WRITTEN_TOKENS, seed=cfg.seed,
                                   progress=lambda kept, n: bar.update(kept - bar.n),
                                   rank=0 if collective else rank, world=1 if collective else world)
        bar.close()
    _barrier()
    return read_prompt_file(file)


def _check_stage2_context(cfg: TrainConfig, tokenizer, prompts, chat: bool, context: int) -> None:
    """Stage 2's longest prompt plus its answer must fit the base model's context: a prompt
    file's longest prompt as encoded, else a corpus cut with room for a chat template."""
    if cfg.stage2_prompts == SELF_WRITTEN:
        longest = len(encode_prompt(tokenizer, "", chat)) + SELF_WRITTEN_TOKENS
        where = f"a prompt the base model writes itself (up to {SELF_WRITTEN_TOKENS} tokens and the template)"
    elif prompts:
        longest = max(len(encode_prompt(tokenizer, prompt, chat)) for prompt in prompts)
        where = f"the longest prompt in --stage2-prompts ({longest} tokens)"
    else:
        longest = cfg.stage2_prompt_length + 64
        where = f"--stage2-prompt-length {cfg.stage2_prompt_length} (+ 64 for a chat template)"
    if longest + cfg.stage2_new_tokens > context:
        raise MLPSpecError(
            f"{where} plus --stage2-new-tokens {cfg.stage2_new_tokens} exceeds the base model's context of {context}"
        )


def _stage2_batch(sequences, order: EpochOrder, indices, length, pad) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_windows([sequences[order[g]] for g in indices], length, pad)


def _masked_targets(targets: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Targets [h, b, n] with IGNORE_INDEX where the target token is padding."""
    h = targets.size(0)
    target_valid = torch.stack([valid[:, i + 2 : i + 2 + n] for i in range(h)])  # h b n
    return targets.masked_fill(~target_valid, IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, objective: SpeculatorObjective, windows: torch.Tensor, valid: torch.Tensor,
             scored: torch.Tensor, n: int, h: int) -> dict:
    """Per-head top-1 accuracy, and chain acceptance: the share of positions where heads
    0..i are all right, so that a greedy top-1 chain would accept i + 1 tokens. Scored
    only where the base model wrote the target tokens itself, greedily (`scored`, not its
    prompt): there that is exactly speculative decoding's acceptance, and 1 + sum(chain)
    its expected tokens per step with one candidate."""
    base_ids, ids, targets = teacher_forcing(windows, n, h)
    targets = _masked_targets(targets, scored, n)
    hidden = base_hidden(model, base_ids, valid[:, :n].long(),
                         feature_layers=objective.speculator.config.feature_layers).float()
    loss, hits = objective(hidden, ids, targets)
    return {"loss": float(loss), **acceptance(hits, targets)}


def acceptance(hits: torch.Tensor, targets: torch.Tensor) -> dict:
    """From the objective's hits [h, b, n] and its targets [h, b, n], over the positions
    where every head has a target: per-head accuracy, chain acceptance (heads 0..i all
    right) and a top-1 chain's expected tokens per step, 1 + sum(chain)."""
    hits = hits[:, (targets != IGNORE_INDEX).all(dim=0)]  # h positions
    chain = hits.long().cumprod(dim=0).float().mean(dim=1)  # h
    return {
        "accuracy": [round(float(a), 4) for a in hits.float().mean(dim=1)],
        "chain_acceptance": [round(float(c), 4) for c in chain],
        "tokens_per_step": round(1 + float(chain.sum()), 4),
    }


def train(cfg: TrainConfig) -> Path:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: nccl's collectives run on the current device
    rank, world = _distributed()
    main = rank == 0
    start_step = _check_out(cfg)
    given = cfg.stage2_prompts not in (None, SELF_WRITTEN)
    stage2_prompts = read_prompt_file(cfg.stage2_prompts) if given else None  # bad files fail now
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)

    model, tokenizer = load_base(cfg.base, dtype=cfg.dtype)
    model.requires_grad_(False)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and cfg.seq_len + cfg.n_predict + 1 > context:
        raise MLPSpecError(f"--seq-len {cfg.seq_len} (+ n_predict + 1) exceeds the base model's context of {context}")
    chat = getattr(tokenizer, "chat_template", None) is not None
    if cfg.stage2_steps and cfg.stage2_prompts == SELF_WRITTEN:
        user_turn_opening(tokenizer)  # a base model without a chat template cannot write requests: fail now
    if cfg.stage2_steps and context is not None:
        _check_stage2_context(cfg, tokenizer, stage2_prompts, chat, context)
    # Rank 0 tokenizes (or finds the cache) first; the others then read its cache.
    if main:
        tokens = tokenized_corpus(cfg.data, tokenizer, cache_dir() / "tokens", cfg.text_field)
    _barrier()
    if not main:
        tokens = tokenized_corpus(cfg.data, tokenizer, cache_dir() / "tokens", cfg.text_field)
    train_tokens, heldout_tokens = split_heldout(tokens)
    h, n = cfg.n_predict, cfg.seq_len
    windows = Windows(train_tokens, n + h + 1, cfg.seed)

    speculator = MLPSpeculator(speculator_config_for(
        model, n_predict=h, inner_dim=cfg.inner_dim, tie_weights=cfg.tie_weights, scale_input=cfg.scale_input,
        tie_base_embeddings=cfg.tie_base_embeddings, draft_vocab_size=cfg.draft_vocab_size,
        token_conditioning=cfg.token_conditioning, emb_adapter=cfg.emb_adapter, feature_layers=cfg.feature_layers,
        base_model_name_or_path=cfg.base,
    ))
    check_pair(model, speculator)
    if cfg.tie_base_embeddings:
        speculator.attach_base(model)
    if cfg.draft_vocab_size:  # the training data's most frequent tokens, in id order
        counts = torch.from_numpy(np.bincount(train_tokens, minlength=speculator.config.vocab_size))
        top = counts.topk(cfg.draft_vocab_size).indices.sort().values
        speculator.set_draft_vocab(top, base=model if cfg.tie_base_embeddings else None)
    if cfg.init_from and not start_step:
        _init_from(speculator, cfg.init_from, model)
    # Built on the CPU above (the draft vocabulary and init-from copies read the base model
    # there), then moved together.
    model.to(device)
    speculator.to(device)
    if cfg.fsdp_base and world > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(asdict(cfg) | {"resume": False}, indent=2) + "\n")
    trainable = [p for p in speculator.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if start_step:
        latest = latest_checkpoint(out)
        state = torch.load(latest / "state.pt", weights_only=True)
        loaded = MLPSpeculator.from_pretrained(latest, dtype=torch.float32, base=model if cfg.tie_base_embeddings else None)
        speculator.load_state_dict(loaded.state_dict(), strict=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    objective = SpeculatorObjective(speculator)
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective)

    # Stage-2 data, and held-out greedy text for evaluation: made once, kept in `out`.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # A sharded base model's forward is a collective: with --fsdp-base every rank runs every
    # generation and evaluation pass in lockstep, and rank 0 alone writes.
    collective = cfg.fsdp_base and world > 1
    eval_files = generate_shards(
        model, tokenizer, heldout_tokens, out / "eval", [0], cfg.eval_rows, cfg.stage2_prompt_length,
        cfg.eval_new_tokens, temperature=0.0, chat=chat, seed=cfg.seed + 1, write=main,
    ) if main or collective else []
    _barrier()
    stage2 = None  # generated when stage 2 begins
    eval_set = None
    if main or collective:
        eval_rows = load_generations(eval_files)
        eval_n = max(len(s) for s in eval_rows) - h - 1
        eval_windows, eval_valid = pad_windows(eval_rows, eval_n + h + 1, pad)
        eval_set = (eval_windows, eval_valid, generated_positions(eval_files, eval_n + h + 1), eval_n)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    log = out / LOG_FILE
    wall = 0.0  # training wall time, summed over the sessions of a resumed run
    if main and start_step and log.is_file():  # drop log lines past the checkpoint we resume from
        lines = [ln for ln in log.read_text().splitlines() if json.loads(ln).get("step", 0) <= start_step]
        log.write_text("".join(ln + "\n" for ln in lines))
        wall = max((json.loads(ln).get("wall_s", 0.0) for ln in lines), default=0.0)
    total = cfg.stage1_steps + cfg.stage2_steps
    bar = tqdm(total=total, initial=start_step, desc="training", disable=not (main and cfg.progress))
    per_step = cfg.batch_size * world
    tick, seen = time.perf_counter(), 0
    for step in range(start_step, total):
        stage = 1 if step < cfg.stage1_steps else 2
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * per_step + rank * cfg.batch_size
            indices = range(first, first + cfg.batch_size)
            if stage == 1:
                window = windows.get(indices).to(device)
                valid = torch.ones_like(window, dtype=torch.bool)
                length = n
            else:
                if stage2 is None:
                    stage2 = _stage2_data(cfg, model, tokenizer, train_tokens, stage2_prompts, chat, rank, world)
                    stage2_n = min(n, max(len(s) for s in stage2) - h - 1)
                    stage2_order = EpochOrder(len(stage2), cfg.seed)
                length = stage2_n
                window, valid = _stage2_batch(stage2, stage2_order, indices, length + h + 1, pad)
                window, valid = window.to(device), valid.to(device)
            base_ids, ids, targets = teacher_forcing(window, length, h)
            with torch.no_grad():
                target_logits = None
                if cfg.targets == "text":
                    hidden = base_hidden(model, base_ids, valid[:, :length].long(), feature_layers=cfg.feature_layers)
                else:  # one base pass over h more positions gives every head's target
                    hidden, logits = base_outputs(model, window[:, : length + h], valid[:, : length + h].long(),
                                                  feature_layers=cfg.feature_layers)
                    hidden, targets = hidden[:, :length], greedy_targets(logits.argmax(-1), length, h)
                    if cfg.targets == "distill":
                        target_logits = greedy_targets(speculator.head_columns(logits), length, h)  # h b n K
                    del logits
                hidden = hidden.float()
            targets = _masked_targets(targets, valid, length)
            sync = world == 1 or micro == cfg.grad_accum - 1
            with autocast, (contextlib.nullcontext() if sync else objective.no_sync()):
                loss, hits = objective(hidden, ids, targets, target_logits)
                (loss / cfg.grad_accum).backward()
            seen += int((targets[0] != IGNORE_INDEX).sum())
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if main and (done % cfg.log_every == 0 or done == total):
            elapsed = time.perf_counter() - tick
            wall += elapsed
            counted = targets != IGNORE_INDEX
            accuracy = [round(float(hits[i][counted[i]].float().mean()), 4) for i in range(h)]
            entry = {"step": done, "stage": stage, "loss": round(float(loss.detach()), 4), "accuracy": accuracy,
                     "lr": lr_at(step, cfg), "tokens_per_s": round(seen * world / elapsed, 1),
                     "wall_s": round(wall, 1)}
            _append(log, entry)
            bar.set_postfix(loss=entry["loss"], acc="/".join(f"{a:.2f}" for a in accuracy), tok_s=entry["tokens_per_s"])
            tick, seen = time.perf_counter(), 0
        bar.update(1)
        if done % cfg.save_every == 0 or done == total:
            if main or collective:
                result = evaluate(model, _unwrap(objective), *(t.to(device) for t in eval_set[:3]), eval_set[3], h)
            if main:
                _append(log, {"step": done, "stage": stage, "eval": result})
                bar.write(f"step {done}: held-out greedy text: accuracy {result['accuracy']}, "
                          f"chain acceptance {result['chain_acceptance']}, tokens/step {result['tokens_per_step']}")
                save_checkpoint(out, done, speculator, optimizer)
            _barrier()
    bar.close()
    if main:
        speculator.save_pretrained(out)
    _barrier()
    return out


def _unwrap(objective):
    return objective.module if isinstance(objective, torch.nn.parallel.DistributedDataParallel) else objective


def _append(log: Path, entry: dict) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(entry) + "\n")
