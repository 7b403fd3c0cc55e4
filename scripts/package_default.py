"""Ship a trained checkpoint as the default speculator for the embedded default base model:
copy its weights (in bfloat16, to stay small) and config into src/mlpspec/default_speculator/,
measure it, and write its model card from the run's own records.

    .venv/bin/python scripts/package_default.py runs/default [--checkpoint runs/default/checkpoints/step-N]
"""

import argparse
import json
import shutil
import datetime
import tempfile
import time
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from mlpspec import load_base, load_speculator
from mlpspec.base import base_hidden, cache_dir
from mlpspec.bench import chat_prompts, code_prompts, compare
from mlpspec.checkpoint import default_speculator_folder
from mlpspec.data import tokenized_corpus
from mlpspec.decode import DEFAULT_LOOKUP
from mlpspec.hardware import describe_machine, hardware_line
from mlpspec.train import LOG_FILE, TrainConfig, train

parser = argparse.ArgumentParser()
parser.add_argument("run", type=Path, help="the training run's output folder")
parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the run's final speculator)")
parser.add_argument("--prompts", type=int, default=12)
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--history", default="", help="a paragraph on how the run got there (resumed with other steps...)")
parser.add_argument("--wall-note", default="both cores", help="how the machine was shared while it trained")
parser.add_argument("--cost-steps", type=int, default=40, help="stage-1 steps timed for the training-cost line (0: none)")
parser.add_argument("--trained-on", default="this project's 2-core CPU", help="the machine the run trained on")
parser.add_argument("--vocab-note", default="the {n} most frequent training tokens (stored as `draft_vocab`), started from the base LM head's rows",
                    help="how the draft vocabulary was chosen, for the card ({n}: its size)")
parser.add_argument("--prompts-note", default="(`scripts/make_instructions.py`: questions and small tasks written from the same corpus)",
                    help="what the run's --stage2-prompts file holds, for the card")
args = parser.parse_args()


def _eval_line(e: dict) -> str:
    chain = ", ".join(f"{c:.3f}" for c in e["chain_acceptance"])
    heads = ", ".join(f"{a:.3f}" for a in e["accuracy"])
    return f"tokens/step {e['tokens_per_step']:.3f} (greedy, one candidate); head accuracy {heads}; chain acceptance {chain}"

source = args.checkpoint or args.run
config = json.loads((args.run / "train_config.json").read_text())
log = [json.loads(line) for line in (args.run / "train_log.jsonl").read_text().splitlines()]
step = int(source.name.split("-")[1]) if source.name.startswith("step-") else max(e["step"] for e in log)
upto = [e for e in log if e["step"] <= step]
wall = max((e.get("wall_s", 0.0) for e in upto), default=0.0)
evals = [e["eval"] for e in upto if "eval" in e]
tokens_seen = step * config["batch_size"] * config["grad_accum"] * config["seq_len"]



def training_cost(steps: int) -> tuple[float, float]:
    """(stage-1 training tokens/s, the base model's forward-only tokens/s) on this machine:
    the run's own speculator settings trained from scratch for `steps` stage-1 steps by the
    real trainer (the first logged interval, which holds the warm-up, left out), and the
    base model's forward pass alone over as many windows of the same shape."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**{**config, "out": tmp, "stage1_steps": steps, "stage2_steps": 0, "init_from": None,
                             "targets": "text", "save_every": steps, "log_every": 10, "resume": False,
                             "progress": False})
        train(cfg)
        log_lines = [json.loads(line) for line in (Path(tmp) / LOG_FILE).read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in log_lines if "tokens_per_s" in e][1:]
    tokens = torch.from_numpy(tokenized_corpus(cfg.data, tokenizer, cache_dir() / "tokens").astype("int64"))
    windows = tokens[: steps * cfg.batch_size * cfg.seq_len].view(steps, cfg.batch_size, cfg.seq_len)
    with torch.no_grad():
        base_hidden(model, windows[0])  # warm-up
        start = time.perf_counter()
        for window in windows[1:]:
            base_hidden(model, window)
    forward = (steps - 1) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)
    return sum(rates) / len(rates), forward


model, tokenizer = load_base(dtype="bfloat16")
cost = training_cost(args.cost_steps) if args.cost_steps else None  # first, while nothing else has run

speculator = load_speculator(source, dtype=torch.bfloat16, base=model)
target = default_speculator_folder()
shutil.rmtree(target, ignore_errors=True)
speculator.save_pretrained(target)

rows = []
for name, prompts, chat in (("code (third-party packages, unseen)", code_prompts(args.prompts), False),
                            ("chat (written for mlpspec)", chat_prompts()[: args.prompts], True)):
    for lookup in (0, DEFAULT_LOOKUP):
        fixed = compare(model, tokenizer, speculator, prompts, chat=chat, max_new_tokens=args.max_new_tokens,
                        lookup=lookup)
        adaptive = compare(model, tokenizer, speculator, prompts, chat=chat, max_new_tokens=args.max_new_tokens,
                           adaptive=True, lookup=lookup)
        decoding = f"the tree + a lookup branch of {lookup}" if lookup else "the speculator's tree alone"
        rows.append((name, len(prompts), decoding, fixed, adaptive))


defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
defaults["data"] = ["default"]


def _flag(key, value) -> str:
    """The CLI spelling of a TrainConfig field: --no-X for a field that is on by default."""
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, list):
        return f"--{name} {','.join(map(str, value))}"
    return f"--{name} {value}"


adapter = (f", read through a learned {speculator.config.emb_dim} -> {speculator.config.width} map (`emb_adapter`)"
           if speculator.config.emb_adapter else "")
layers = speculator.config.feature_layers
layers = (f"; the first stage also reads the base model's states after layers {', '.join(map(str, layers))} "
          "(`feature_layers`, each through a learned map)" if layers else "")
flags = " ".join(_flag(k, v) for k, v in config.items()
                 if k not in ("out", "data", "resume", "progress", "base") and v != defaults.get(k))
stage2_source = (f"the chat prompts in `{config['stage2_prompts']}` {args.prompts_note}"
                 if config.get("stage2_prompts") else "prompts cut from it")
speed_row = "" if cost is None else (
    f"| training speed | stage 1 trains at {cost[0]:.0f} tokens/s on this CPU against {cost[1]:.0f} tokens/s for the base "
    f"model's forward pass alone ({cost[0] / cost[1]:.2f}x; same settings, {config['batch_size']} x {config['seq_len']} "
    "tokens a step, timed by this script on an otherwise idle machine) |\n")
vocab = args.vocab_note.format(n=speculator.config.draft_vocab_size)
size_mb = (target / "model.safetensors").stat().st_size / 1e6
table = "\n".join(
    f"| {name} | {n} | {decoding} | {f.tokens_per_step:.2f} | {f.speedup:.2f}x | {a.tokens_per_step:.2f} | {a.speedup:.2f}x |"
    for name, n, decoding, f, a in rows
)
card = f"""# Default speculator for SmolLM2-135M-Instruct

Trained by mlpspec's own pipeline on {args.trained_on}; `mlpspec.load_speculator()`
returns it (loading the default base model too, since it shares that model's embedding).

| | |
|---|---|
| base model | SmolLM2-135M-Instruct (hidden size 576, vocabulary 49152) |
| heads | {speculator.config.n_predict}, tree {speculator.config.top_k_tokens_per_head} x {speculator.config.n_candidates} candidates |
| extensions (not in the released format) | embedding tied to the base model's (frozen, not stored){adapter}{layers}; heads score a draft vocabulary of {vocab}; stages share weights (`tie_weights`) |
| file | {size_mb:.1f} MB, bfloat16 |
| data | `--data default`: the Python {__import__('sys').version_info.major}.{__import__('sys').version_info.minor} standard library's source and Debian's python3.11-doc sources (about 12M tokens); stage 2 on the base model's own answers to {stage2_source} |
| steps | {step}: {min(step, config['stage1_steps'])} in stage 1, {max(0, step - config['stage1_steps'])} in stage 2, {config['batch_size']} x {config['seq_len']} tokens each ({tokens_seen / 1e6:.1f}M tokens seen) |
| wall time | {wall / 3600:.2f} h of training on {args.trained_on} ({args.wall_note}) |
{speed_row}| stage 2 against stage 1 alone | at equal total steps (600) stage 1 + stage 2 decoded 1.51 against stage 1 alone's 1.48 tokens/step on code and 1.30 against 1.24 on chat, the held-out eval level (1.290 both; docs/claims/claims.md) |
| held-out eval at step {step} | {_eval_line(evals[-1]) if evals else 'none'} |

Training command, as the run's config now stands (resumable; `--resume` continues it):

    mlpspec train --out {args.run} --data default {flags}

{args.history or ''}

## Measured

Batch 1, greedy, bfloat16, {args.max_new_tokens} new tokens per prompt, against plain decoding
through the same loop, measured in one process on {datetime.date.today()} ({hardware_line(describe_machine())})
with `.venv/bin/python scripts/package_default.py {args.run}`. "Fixed" verifies the whole tree
every step; "adaptive" lets the policy pick each step's shape (docs/RESULTS.md). The lookup
branch (docs/generating.md, "The prompt-lookup branch") is the decoder's, not the speculator's: the
rows without it are what this speculator does alone.

| prompts | n | candidates | tokens/step (fixed) | speedup (fixed) | tokens/step (adaptive) | speedup (adaptive) |
|---|---|---|---|---|---|---|
{table}
"""
(target / "README.md").write_text(card)
print(card)
