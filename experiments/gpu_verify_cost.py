"""Verify cost on a GPU, and the speedups it projects with tokens/step measured here.

Two parts, because this project's GPU is lent for minutes and its CPU has the trained model:

    # on a GPU machine: a Llama-3.2-1B-shaped model with random weights, bf16
    python experiments/gpu_verify_cost.py measure --out DIR            # writes DIR/costs.json
    # here: tokens/step of the shipped speculator per tree shape, code and chat prompts
    .venv/bin/python experiments/gpu_verify_cost.py project --costs DIR/costs.json --out docs/gpu

`measure` times, on one device, with the device synchronised around each timed region:
- the base forward over a tree of q nodes after a P-token context, for each batch size
  (decode.verify on the decoder's own cache, rolled back after each pass: the same
  measurement the adaptive policy calibrates with), at two context lengths;
- the speculator's proposals for each tree shape (random weights: cost does not depend
  on them);
- whole decoding runs of our loop with each fixed shape, and HF `generate`, in seconds per
  step. Random weights accept nothing, so every step costs what a step of that shape costs.

`project` measures tokens/step for the same shapes with the embedded default and the shipped
speculator on this CPU, and multiplies: projected speedup over HF greedy =
tokens/step x (HF seconds per token) / (our seconds per step). Acceptance depends on the
pair of models, so this is a projection for a 1B model whose speculator accepts as ours does
on SmolLM2, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = {  # name -> (top_k_tokens_per_head, n_candidates, lookup); fixed shapes use all 4 stages
    "chain-4": ([1, 1, 1, 1], 1, 0),
    "tree-4x5": ([4, 3, 2, 2], 5, 0),
    "tree-4x5+lookup10": ([4, 3, 2, 2], 5, 10),
    "lookup10": (None, 0, 10),  # prompt lookup alone, no speculator
}


def llama_1b_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:  # a CPU check of this script
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                           bos_token_id=None, eos_token_id=None, pad_token_id=0)
    # Llama-3.2-1B's shape: 1.24B parameters
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                       max_position_embeddings=8192, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def speculator_for(model):
    """The shipped default's design (tied base embeddings, emb adapter, tied stages, an
    8192-token draft vocabulary, 4 stages) sized for `model`, with random weights."""
    from mlpspec import MLPSpeculator, speculator_config_for

    vocab = model.config.vocab_size
    cfg = speculator_config_for(model, n_predict=4, top_k_tokens_per_head=[4, 3, 2, 2], n_candidates=5,
                                tie_weights=True, tie_base_embeddings=True, emb_adapter=True,
                                draft_vocab_size=min(8192, vocab // 2))
    speculator = MLPSpeculator(cfg)
    speculator.attach_base(model)  # before moving: until then the base-tied weights are meta tensors
    return speculator.to(device=model.device, dtype=model.dtype).eval()


def shape_arguments(speculator, name: str) -> tuple:
    """(speculator or None, keyword arguments) that make speculative_generate use shape `name`."""
    top_k, n_candidates, lookup = SHAPES[name]
    if top_k is None:
        return None, {"lookup": lookup}
    return speculator, {"top_k_tokens_per_head": top_k, "n_candidates": n_candidates, "lookup": lookup}


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def median(self, fn, reps: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            self.sync()
            tick = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - tick)
        return statistics.median(times)


def kernel_seconds(fn, reps: int) -> float:
    """Seconds the device spends in kernels per call of fn, from the profiler: what a step
    costs once host overhead is gone (CUDA graphs, a compiled server), unlike wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    micros = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    return micros * 1e-6 / reps


def forward_curve(model, timer: Timer, batch_sizes, nodes, context: int, reps: int, gen: torch.Generator,
                  kernels: bool = False) -> dict:
    """Seconds per base forward over q tree nodes after `context` committed tokens, [b][q]:
    wall time, or with `kernels` the device's kernel time."""
    from mlpspec.decode import prefill, verify
    from mlpspec.tree import flat_tree

    curve = {}
    for b in batch_sizes:
        ids = torch.randint(1, model.config.vocab_size, (b, context), generator=gen).to(model.device)
        valid = torch.ones_like(ids, dtype=torch.bool)
        state = prefill(model, ids, valid, context + max(nodes) + 1, lambda logits, depth: logits.argmax(dim=-1), 1, 4)
        nothing = torch.empty(b, 0, dtype=torch.long, device=model.device)
        curve[b] = {}
        for q in nodes:
            tree = flat_tree(state.pending, q)

            def one_pass():
                verify(model, state, tree)
                state.cache.keep(context, nothing)

            curve[b][q] = kernel_seconds(one_pass, reps) if kernels else timer.median(one_pass, reps)
            print(f"  {'kernels' if kernels else 'forward':8s} P={context} b={b:2d} q={q:3d}: {curve[b][q] * 1e3:7.2f} ms", flush=True)
    return curve


def propose_costs(model, speculator, timer: Timer, batch_sizes, reps: int, gen: torch.Generator) -> dict:
    """Seconds per speculator proposal for each speculative shape, [shape][b]."""
    costs = {}
    d = model.config.hidden_size
    for name, (top_k, n_candidates, _) in SHAPES.items():
        if top_k is None:
            continue
        costs[name] = {}
        for b in batch_sizes:
            hidden = torch.randn(b, 1, d, generator=gen).to(model.device, model.dtype)  # b 1 d
            last = torch.randint(0, model.config.vocab_size, (b, 1), generator=gen).to(model.device)  # b 1
            costs[name][b] = timer.median(lambda: speculator.propose(hidden, last, top_k, n_candidates), reps)
        print(f"  propose  {name:18s} " + " ".join(f"b={b}:{costs[name][b] * 1e3:.2f}ms" for b in batch_sizes),
              flush=True)
    return costs


def loop_costs(model, speculator, timer: Timer, batch_sizes, context: int, new_tokens: int,
               gen: torch.Generator) -> dict:
    """Seconds per step of whole decoding runs: HF generate (per token), our loop plain, and
    our loop with each fixed shape. [method][b]."""
    from mlpspec.generate import speculative_generate

    costs = {"hf_greedy": {}, "ours_plain": {}, **{name: {} for name in SHAPES}}
    for b in batch_sizes:
        ids = torch.randint(1, model.config.vocab_size, (b, context), generator=gen).to(model.device)
        mask = torch.ones_like(ids)

        def hf():
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)

        costs["hf_greedy"][b] = timer.median(hf, reps=3, warmup=1) / new_tokens
        runs = {"ours_plain": (None, {})}
        runs.update({name: shape_arguments(speculator, name) for name in SHAPES})
        for method, (spec, kwargs) in runs.items():
            steps = []

            def ours():
                out = speculative_generate(model, spec, ids, mask, max_new_tokens=new_tokens, **kwargs)
                steps.append(out.stats.steps)

            seconds = timer.median(ours, reps=3, warmup=1)
            costs[method][b] = seconds / statistics.median(steps)
        print(f"  loop     b={b:2d} ms/step: " + " ".join(f"{m} {costs[m][b] * 1e3:.1f}" for m in costs), flush=True)
    return costs


def measure(args) -> None:
    from transformers import LlamaForCausalLM

    import transformers

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = llama_1b_config(args.tiny)
    with device:
        model = LlamaForCausalLM(config).to(dtype).eval()
    speculator = speculator_for(model)
    timer = Timer(device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    nodes = [int(q) for q in args.nodes.split(",")]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.2f}B parameters, {dtype}, {device}", flush=True)
    report = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        },
        "model": {"parameters": n_params, "config": config.to_dict(), "dtype": args.dtype,
                  "attention": model.config._attn_implementation},
        "settings": vars(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        "forward": lambda: {P: forward_curve(model, timer, batch_sizes, nodes, P, args.reps, gen)
                            for P in (args.context, args.long_context)},
        "kernels": lambda: {P: forward_curve(model, timer, batch_sizes, nodes, P, args.reps, gen, kernels=True)
                            for P in (args.context, args.long_context)},
        "propose": lambda: propose_costs(model, speculator, timer, batch_sizes, args.reps, gen),
        "loop": lambda: loop_costs(model, speculator, timer, batch_sizes, args.context, args.new_tokens, gen),
    }
    with torch.inference_mode():
        for name in args.parts.split(","):
            part = parts[name]
            report[name] = part()
            (out / "costs.json").write_text(json.dumps(report, indent=1))  # after each part: device time is short
    print(f"wrote {out / 'costs.json'}")


def tokens_per_step(args) -> dict:
    """Tokens/step of the shipped speculator for each shape, on code and on chat prompts,
    greedy, batch 1 (the embedded default base model, this machine)."""
    from mlpspec import load_base, load_speculator
    from mlpspec.bench import chat_prompts, code_prompts
    from mlpspec.generate import speculative_generate
    from mlpspec.text import encode_prompts

    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_base(dtype=dtype)
    speculator = load_speculator(None, base=model, dtype=dtype)
    kinds = {"code": (code_prompts(args.prompts), False), "chat": (chat_prompts()[: args.prompts], True)}
    result = {}
    for kind, (prompts, chat) in kinds.items():
        result[kind] = {}
        for name in SHAPES:
            tokens = steps = 0
            spec, kwargs = shape_arguments(speculator, name)
            for prompt in prompts:
                ids, mask = encode_prompts(tokenizer, [prompt], chat=chat)
                out = speculative_generate(model, spec, ids, mask, max_new_tokens=args.new_tokens, **kwargs)
                tokens += int(out.stats.emitted.sum())
                steps += out.stats.steps
            result[kind][name] = tokens / steps
            print(f"  {kind:4s} {name:18s} {result[kind][name]:.2f} tokens/step", flush=True)
    return result


def project(args) -> None:
    costs = json.loads(Path(args.costs).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cached = out / "tokens_per_step.json"
    if cached.exists():
        accepted = json.loads(cached.read_text())
    else:
        accepted = tokens_per_step(args)
        cached.write_text(json.dumps(accepted, indent=1))
    projection = {"eager": eager_projection(costs, accepted)}
    if "kernels" in costs:
        projection["kernels"] = kernel_projection(costs, accepted)
    (out / "projection.json").write_text(json.dumps(projection, indent=1))
    write_report(costs, accepted, projection, out)


def _with_best(table: dict) -> dict:
    """Add each batch size's best shape: what a policy that knew acceptance would pick."""
    batch_sizes = list(next(iter(table.values())))
    return {**table, "best": {b: max(row[b] for row in table.values()) for b in batch_sizes}}


def eager_projection(costs: dict, accepted: dict) -> dict:
    """tokens/step x HF's wall seconds per token / our wall seconds per step, [kind][shape][b]:
    mlpspec as it is, eager, on that machine's host."""
    loop = costs["loop"]
    return {kind: _with_best({name: {b: accepted[kind][name] * loop["hf_greedy"][b] / loop[name][b]
                                     for b in loop["hf_greedy"]} for name in SHAPES}) for kind in accepted}


def max_nodes(name: str) -> int:
    top_k, n_candidates, lookup = SHAPES[name]
    return 1 + n_candidates * len(top_k or ()) + lookup


def kernel_projection(costs: dict, accepted: dict) -> dict:
    """tokens/step x kernel time of a 1-node forward / kernel time of a forward over the
    shape's largest tree, at the shorter context, [kind][shape][b]: the bound once host
    overhead is gone (graph-captured decoding). The speculator is left out: its weights
    (about 50 MB a stage here) take about 0.05 ms a proposal at the card's bandwidth."""
    curve = costs["kernels"][str(costs["settings"]["context"])]

    def seconds(b: str, q: int) -> float:  # the measured size at or above q: an upper bound
        return curve[b][str(min(int(n) for n in curve[b] if int(n) >= q))]

    return {kind: _with_best({name: {b: accepted[kind][name] * seconds(b, 1) / seconds(b, max_nodes(name))
                                     for b in curve} for name in SHAPES}) for kind in accepted}


def write_report(costs: dict, accepted: dict, projection: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine, model = costs["machine"], costs["model"]
    lines = [f"# Verify cost on {machine['device']} and projected speedups", "",
             f"Base: Llama-3.2-1B-shaped, random weights ({model['parameters'] / 1e9:.2f}B parameters), "
             f"{model['dtype']}, attention `{model['attention']}`, eager PyTorch; torch {machine['torch']}, "
             f"transformers {machine['transformers']}.", "",
             f"Settings: {costs['settings']}.", ""]
    headings = {"kernels": "Base forward, device kernel time (ms; profiler sum, mean of the passes)",
                "forward": "Base forward, wall time (ms; median, eager, host overhead included)"}
    for timing in ("kernels", "forward"):
        for P, curve in costs.get(timing, {}).items():
            qs = list(next(iter(curve.values())))
            lines += [f"## {headings[timing]}, q tree nodes after P = {P} context tokens", "",
                      "| batch | " + " | ".join(f"q={q}" for q in qs) + " |", "|---|" + "---|" * len(qs)]
            lines += [f"| {b} | " + " | ".join(f"{curve[b][q] * 1e3:.2f}" for q in qs) + " |" for b in curve]
            lines.append("")
    lines += ["## Speculator proposal, wall time (ms)", "", "| shape | " + " | ".join(
        f"b={b}" for b in costs["loop"]["hf_greedy"]) + " |", "|---|" + "---|" * len(costs["loop"]["hf_greedy"])]
    lines += [f"| {name} | " + " | ".join(f"{t * 1e3:.2f}" for t in row.values()) + " |"
              for name, row in costs["propose"].items()]
    lines.append("")
    loop = costs["loop"]
    batch_sizes = list(loop["hf_greedy"])
    lines += ["## Whole decoding runs (ms per step; HF per token)", "",
              "| method | " + " | ".join(f"b={b}" for b in batch_sizes) + " |", "|---|" + "---|" * len(batch_sizes)]
    lines += [f"| {m} | " + " | ".join(f"{loop[m][b] * 1e3:.1f}" for b in batch_sizes) + " |" for m in loop]
    lines += ["", "## Tokens/step measured here (SmolLM2-135M-Instruct + shipped speculator, CPU, greedy, batch 1)", "",
              "| shape | code | chat |", "|---|---|---|"]
    lines += [f"| {name} | {accepted['code'][name]:.2f} | {accepted['chat'][name]:.2f} |" for name in SHAPES]
    titles = {
        "eager": ("PROJECTED speedup over HF greedy, eager, as measured on that machine",
                  "tokens/step (measured here) x HF's wall ms per token / our wall ms per step (measured there)."),
        "kernels": ("PROJECTED speedup over a 1-node forward, kernel time only (host overhead gone)",
                    "tokens/step (measured here) x kernel ms of a 1-node forward / kernel ms of a forward over the "
                    "shape's largest tree (P = context). An upper bound: the speculator's own cost is left out."),
    }
    for mode, table in projection.items():
        title, how = titles[mode]
        lines += ["", f"## {title}", "", how + " A projection: it assumes a 1B model's speculator accepts "
                  "as ours does on SmolLM2.", ""]
        for kind in table:
            columns = list(table[kind]["best"])
            lines += [f"{kind}:", "", "| shape | " + " | ".join(f"b={b}" for b in columns) + " |",
                      "|---|" + "---|" * len(columns)]
            lines += [f"| {name} | " + " | ".join(f"{row[b]:.2f}x" for b in columns) + " |"
                      for name, row in table[kind].items()]
            lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    timing = "kernels" if "kernels" in costs else "forward"
    context = str(costs["settings"]["context"])
    curve = costs[timing][context]
    for b in curve:
        left.plot([int(q) for q in curve[b]], [t * 1e3 for t in curve[b].values()], marker="o", label=f"batch {b}")
    left.set(xscale="log", xlabel="tree nodes q", ylabel=f"base forward, {'kernel' if timing == 'kernels' else 'wall'} ms",
             title=f"Verify cost, 1B random weights, P={context}")
    left.legend()
    labels = {"eager": "eager wall time (host-bound, noisy)", "kernels": "kernel time (bound)"}
    for mode, table in projection.items():
        for kind, style in (("code", "-"), ("chat", "--")):
            best = table[kind]["best"]
            right.plot([int(b) for b in best], list(best.values()), style, marker="o", label=f"{kind}, best shape, {labels[mode]}")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xscale="log", xlabel="batch size", ylabel="speedup", title="PROJECTED (GPU costs x CPU tokens/step)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "verify_cost.png", dpi=120)
    print(f"wrote {out / 'report.md'} and {out / 'verify_cost.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time the verify curve and decoding steps (on a GPU)")
    m.add_argument("--device", default="cuda")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--batch-sizes", default="1,2,4,8,16")
    m.add_argument("--nodes", default="1,2,4,8,16,32,64,128")
    m.add_argument("--context", type=int, default=512)
    m.add_argument("--long-context", type=int, default=2048)
    m.add_argument("--new-tokens", type=int, default=64)
    m.add_argument("--reps", type=int, default=20)
    m.add_argument("--parts", default="forward,kernels,propose,loop",
                   help="kernels: the forward curve in device kernel time (needs CUDA)")
    m.add_argument("--tiny", action="store_true", help="a tiny random model: checks the script on a CPU")
    m.add_argument("--out", required=True)
    p = sub.add_parser("project", help="tokens/step here x the GPU's costs")
    p.add_argument("--costs", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    measure(args) if args.command == "measure" else project(args)


if __name__ == "__main__":
    main()
