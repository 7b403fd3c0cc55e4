"""The paper's three claims, reproduced at this project's scale, top to bottom.

    .venv/bin/python scripts/reproduce_claims.py --out runs/claims [--steps 600]

1. Conditioning each stage on the token sampled before it beats a speculator that reads
   the context vector only (Medusa-style), at the same size and training budget.
2. Stage 1 + stage 2 beats stage 1 alone at equal total steps.
3. The speedup shrinks as the batch size and the prompt length grow.

Claims 1 and 2 train three speculators for the embedded default base model with the same
data, seed, schedule and budget (--steps, of which a third is stage 2 where there is one),
then decode unseen code and chat prompts with each at batch 1, greedy, with the fixed tree,
and count tokens per step. Claim 3 is `mlpspec bench` on the shipped default speculator.
Every step is resumable: rerun the same command after an interruption. Writes claims.md,
claims.json and the plots into --out.
"""

import argparse
import json
from pathlib import Path

import torch

from mlpspec import load_base, load_speculator
from mlpspec.bench import BenchSettings, chat_prompts, code_prompts, compare, run_bench, write_report
from mlpspec.decode import head_acceptance
from mlpspec.train import LOG_FILE, RUN_CONFIG, TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, default=Path("runs/claims"))
parser.add_argument("--steps", type=int, default=600, help="training steps per speculator")
parser.add_argument("--prompts", type=int, default=8, help="code prompts and chat prompts each, for claims 1-2")
parser.add_argument("--max-new-tokens", type=int, default=48)
parser.add_argument("--skip-bench", action="store_true", help="claims 1 and 2 only")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)

stage2 = args.steps // 3
RUNS = {  # name: (what differs from the default speculator's recipe, stage-1 steps, stage-2 steps)
    "conditioned, stage 1 + 2": ({}, args.steps - stage2, stage2),
    "Medusa-style, stage 1 + 2": ({"token_conditioning": False}, args.steps - stage2, stage2),
    "conditioned, stage 1 alone": ({}, args.steps, 0),
}
RECIPE = dict(tie_base_embeddings=True, draft_vocab_size=8192, tie_weights=True, n_predict=4, seq_len=256,
              batch_size=4, lr=1e-3, stage2_rows=256, dtype="bfloat16", save_every=100, log_every=10,
              eval_rows=8, progress=True, stage2_dir=str(args.out / "stage2"))


def trained(name: str, changes: dict, stage1: int, stage2: int) -> Path:
    out = args.out / name.replace(",", "").replace(" + ", "+").replace(" ", "-")
    log = out / LOG_FILE
    total = stage1 + stage2
    if log.is_file() and any(json.loads(line)["step"] == total for line in log.read_text().splitlines()):
        if (out / "model.safetensors").is_file():
            return out
    resume = (out / RUN_CONFIG).is_file()
    train(TrainConfig(out=str(out), stage1_steps=stage1, stage2_steps=stage2, resume=resume, **RECIPE, **changes))
    return out


folders = {name: trained(name, *spec) for name, spec in RUNS.items()}

model, tokenizer = load_base(dtype="bfloat16")
decoding = {}
for name, folder in folders.items():
    speculator = load_speculator(folder, dtype=torch.bfloat16, base=model)
    evals = [json.loads(line)["eval"] for line in (folder / LOG_FILE).read_text().splitlines() if "eval" in line]
    decoding[name] = {"eval": evals[-1]}
    for kind, prompts, chat in (("code", code_prompts(args.prompts), False), ("chat", chat_prompts()[: args.prompts], True)):
        result = compare(model, tokenizer, speculator, prompts, chat=chat, max_new_tokens=args.max_new_tokens)
        heads = head_acceptance(result.accepted_lengths, speculator.config.n_predict)
        decoding[name][kind] = {"tokens_per_step": round(result.tokens_per_step, 3), "speedup": round(result.speedup, 3),
                                "per_head_acceptance": [round(a, 3) for a in heads]}
    print(name, decoding[name])

lines = [
    "# The paper's claims at our scale",
    "",
    f"Three speculators for SmolLM2-135M-Instruct, each {args.steps} steps of {RECIPE['batch_size']} x "
    f"{RECIPE['seq_len']} tokens (`--data default`, lr {RECIPE['lr']}, seed 0, bfloat16), stage 2 on "
    f"{RECIPE['stage2_rows']} of the base model's own sampled answers. Decoding: batch 1, greedy, the fixed tree "
    f"`[4, 3, 2, 2] x 5`, {args.max_new_tokens} new tokens for each of {args.prompts} unseen code prompts and "
    f"{args.prompts} chat prompts. Eval: the trainer's held-out check on the base model's greedy answers.",
    "",
    "| speculator | decoding tokens/step, code | chat | per-head acceptance, code | eval tokens/step (top-1 chain) |",
    "|---|---|---|---|---|",
]
for name, r in decoding.items():
    heads = " ".join(f"{a:.2f}" for a in r["code"]["per_head_acceptance"])
    lines.append(f"| {name} | {r['code']['tokens_per_step']:.3f} | {r['chat']['tokens_per_step']:.3f} | {heads} | "
                 f"{r['eval']['tokens_per_step']:.3f} |")
(args.out / "claims.json").write_text(json.dumps(decoding, indent=2) + "\n")

if not args.skip_bench:
    speculator = load_speculator(dtype=torch.bfloat16, base=model)
    settings = BenchSettings(batch_sizes=[1, 2, 4, 8, 16], prompt_lengths=[64, 256, 1024])
    report = run_bench(model, tokenizer, speculator, settings,
                       progress=lambda done, total: print(f"bench {done}/{total}", flush=True))
    write_report(report, args.out / "bench")
    lines += ["", "Claim 3, from `mlpspec bench` on the shipped default speculator (see bench/report.md):", "",
              "| batch | ours fixed speedup | ours adaptive speedup |", "|---|---|---|"]
    for b in report["results"]["ours_fixed"]:
        lines.append(f"| {b} | {report['results']['ours_fixed'][b]['speedup']:.2f}x | "
                     f"{report['results']['ours_adaptive'][b]['speedup']:.2f}x |")
    lines += ["", "| prompt tokens (batch 1) | ours fixed speedup | ours adaptive speedup |", "|---|---|---|"]
    for length, r in report["prompt_length"].items():
        lines.append(f"| {length} | {r['ours_fixed']:.2f}x | {r['ours_adaptive']:.2f}x |")
(args.out / "claims.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
