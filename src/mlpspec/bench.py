"""Measuring speculation: prompt sets the training data never saw, and runs that compare
speculative decoding with plain decoding in one process, on the same prompts."""

from __future__ import annotations

import itertools
import math
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .adaptive import AdaptivePolicy, shape_menu
from .base import as_runner
from .decode import DEFAULT_LOOKUP, head_acceptance
from .equality import find_divergences
from .generate import speculative_generate
from .hardware import describe_machine, hardware_line
from .kernels import kernels_of
from .llama_cpp import LlamaCppPeer, LlamaCppRunner
from .text import encode_prompts, read_prompt_file

# Third-party packages whose source serves as unseen code: training uses the standard
# library only, never site-packages.
CODE_PACKAGES = ("transformers", "requests", "urllib3", "tqdm", "jinja2", "huggingface_hub", "datasets", "click")


def code_prompts(n: int = 12, context_lines: int = 12) -> list[str]:
    """`n` prompts cut from installed third-party packages: the lines that lead up to a
    function definition, ending with its `def` line, so the model writes the body."""
    site = Path(sysconfig.get_paths()["purelib"])
    per_package: list[list[str]] = []
    for package in CODE_PACKAGES:
        files = sorted((site / package).rglob("*.py")) if (site / package).is_dir() else []
        prompts = []
        for file in files[:: max(1, len(files) // 8)]:
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
            defs = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and line.rstrip().endswith(":")]
            if defs:
                i = defs[len(defs) // 2]
                prompts.append("\n".join(lines[max(0, i - context_lines) : i + 1]) + "\n")
        per_package.append(prompts)
    # round-robin over packages, so a small n still spans several code bases
    longest = max((len(g) for g in per_package), default=0)
    mixed = [g[k] for k in range(longest) for g in per_package if k < len(g)]
    return mixed[:n]


def chat_prompts() -> list:
    """Chat prompts written for mlpspec (not from any training data)."""
    return read_prompt_file(Path(str(resources.files("mlpspec") / "prompts" / "chat.jsonl")))


def named_prompts(name: str) -> list:
    """"chat" or "code": the 12 prompts of that kind that the per-kind benches use; any
    other name is a prompt file."""
    kinds = {"chat": lambda: chat_prompts()[:12], "code": lambda: code_prompts(12)}
    return kinds[name]() if name in kinds else read_prompt_file(name)


@dataclass
class Comparison:
    tokens: int
    steps: int
    speculative_seconds: float
    plain_seconds: float
    accepted_lengths: list[int]

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.speculative_seconds


def compare(model, tokenizer, speculator, prompts: list, chat: bool, max_new_tokens: int = 64,
            adaptive: bool = False, lookup: int = 0) -> Comparison:
    """Batch-1 greedy decoding of every prompt, speculative then plain, interleaved so
    that both see the same machine state; returns the totals. With `adaptive`, one policy
    learns across all the prompts, as it would in a serving process; `lookup` adds the
    prompt-lookup branch."""
    total = Comparison(0, 0, 0.0, 0.0, [])
    policy = AdaptivePolicy(shape_menu(speculator.config, lookup=lookup)) if adaptive else False
    for prompt in prompts:
        ids, mask = encode_prompts(tokenizer, [prompt], chat=chat)
        start = time.perf_counter()
        out = speculative_generate(model, speculator, ids, mask, max_new_tokens=max_new_tokens, adaptive=policy,
                                   lookup=lookup)
        total.speculative_seconds += time.perf_counter() - start
        start = time.perf_counter()
        plain = speculative_generate(model, None, ids, mask, max_new_tokens=max_new_tokens)
        total.plain_seconds += time.perf_counter() - start
        total.tokens += int(out.stats.emitted.sum())
        total.steps += out.stats.row_steps
        total.accepted_lengths += out.stats.accepted_lengths
        if model.dtype == torch.float32 and not torch.equal(out.sequences, plain.sequences):
            raise AssertionError("speculative and plain greedy decoding differ in float32")
    return total


# ---------------------------------------------------------------------------------------
# `mlpspec bench`: every method, every batch size, one process, interleaved after warm-up.

HF_METHODS = ("hf_greedy", "hf_prompt_lookup", "hf_assisted")
# on the llama.cpp backend, llama.cpp's own decoding takes transformers' place: greedy, and its
# prompt lookup (llama-cpp-python's LlamaPromptLookupDecoding, 10 tokens), one row at a time
LLAMA_CPP_METHODS = ("llama_cpp_greedy", "llama_cpp_lookup")
PEERS = HF_METHODS + LLAMA_CPP_METHODS
# ours_lookup: the prompt-lookup branch alone; ours_fixed: the speculator's fixed tree alone
# (the paper's method); ours_adaptive: the policy's pick among both and their sum, per step
OUR_METHODS = ("ours_plain", "ours_lookup", "ours_fixed", "ours_adaptive")
# transformers' assisted decoding is batch 1; ours_lookup stands beside transformers' prompt
# lookup, and alone at batch 4-16 it ran at 0.37-0.68x HF greedy and took two minutes of the bench
BATCH_ONE_ONLY = ("hf_prompt_lookup", "hf_assisted", "ours_lookup", "llama_cpp_lookup")
# what the floor compares (ours adaptive against the best plain method) gets extra batches
FLOOR_METHODS = ("hf_greedy", "llama_cpp_greedy", "ours_plain", "ours_adaptive")
# the plain methods that also run at batch 1 on the base model in the other dtype (float32
# beside bfloat16 and back), for the fastest plain decoding the machine offers: on a CPU
# held to AVX2 kernels, bfloat16 decoded plain at 30 tokens/s and float32 at 16, while
# float32 is the dtype to speculate in there
OTHER_DTYPE_METHODS = ("hf_greedy", "ours_plain")


def other_dtype_method(method: str, dtype: torch.dtype) -> str:
    """The name of a plain method run in the other dtype: hf_greedy_float32, ..."""
    return f"{method}_{str(dtype).removeprefix('torch.')}"


@dataclass
class BenchSettings:
    batch_sizes: list[int]
    # 40, not 64 as up to v35: with the other dtype's plain methods beside the rest, the
    # default bench took 20 minutes on a 2-core AMD EPYC that made 20 tokens/s with HF
    # greedy; with 48 tokens and the cuts below, 11
    max_new_tokens: int = 40
    n_code: int = 6
    n_chat: int = 6
    prompt_lengths: list[int] | None = None  # batch-1 sweep of prompt length (tokens); None or [] to skip
    methods: list[str] | None = None  # None: every method that applies
    lookup: int = DEFAULT_LOOKUP  # the prompt-lookup branch of ours_lookup and ours_adaptive (0: none)
    prompts: list | None = None  # None: n_code unseen code prompts and n_chat chat prompts
    # batches per batch size, at least (each prompt is used once per batch size, and more if
    # this asks for more). With 3, batch 4 was about 5 s a method, and the bench gave the
    # adaptive policy 0.967x there where 12 interleaved batches gave it 1.03x
    min_batches: int = 6
    # ... and at least this many for FLOOR_METHODS: at batch 8-16 ours adaptive decodes
    # plain, so the floor is one plain loop's pace over another's, and one batch at 16 read
    # anywhere from 240 to 305 tokens/s for either (v31); over 6 batches the floor there
    # read 0.93-1.00 from run to run. 12 took 4 of the default bench's 20 minutes above
    floor_batches: int = 8
    # the largest batch size ours_fixed runs at: the fixed tree made 0.50x and 0.40x HF
    # greedy at batch 8 and 16 in every bench up to v35, and took 3 of those 20 minutes
    fixed_up_to: int = 4
    # a time budget for the whole run (None: none): past the first REQUIRED_BATCHES of each
    # batch size, a batch runs only where its batch size's batches so far say it ends in
    # time. On a 2-core AMD EPYC held to AVX2 kernels the default bench took 21 minutes
    # (bfloat16 emulated: HF greedy made 27 tokens/s at batch 16, and batch 16 took 7 of them)
    minutes: float | None = None


# batches every batch size gets whatever the budget, so that no figure rests on one run
REQUIRED_BATCHES = 2


def _methods_at(methods: list[str], batch_size: int, fixed_up_to: int) -> list[str]:
    """The methods that run at this batch size: BATCH_ONE_ONLY and the other dtype's at
    batch 1 only, ours_fixed up to fixed_up_to."""
    ours = (*PEERS, *OUR_METHODS)
    return [m for m in methods if (batch_size == 1 or (m not in BATCH_ONE_ONLY and m in ours))
            and (m != "ours_fixed" or batch_size <= fixed_up_to)]


def _new_token_count(row: list[int], prompt_length: int, eos: set[int]) -> int:
    new = row[prompt_length:]
    for i, token in enumerate(new):
        if token in eos:
            return i + 1
    return len(new)


def _run(method, model, speculator, assistant, policy, ids, mask, max_new_tokens, eos, lookup, other=None,
         peers=None):
    """One method on one batch: (sequences, seconds, stats or None). A method of the other
    dtype (other_dtype_method) runs its plain method on `other`; llama.cpp's own methods
    run on `peers` (method -> llama_cpp.LlamaCppPeer)."""
    if other is not None and method.endswith("_" + str(other.dtype).removeprefix("torch.")):
        model, method = other, method.rsplit("_", 1)[0]
    ids, mask = ids.to(model.device), mask.to(model.device)
    start = time.perf_counter()
    if method in LLAMA_CPP_METHODS:
        rows = [peers[method].generate(row[valid].tolist(), max_new_tokens, eos) for row, valid in zip(ids, mask.bool())]
        seconds = time.perf_counter() - start
        new = torch.tensor([r + [eos[0] if eos else 0] * (max_new_tokens - len(r)) for r in rows], dtype=ids.dtype)
        return torch.cat([ids, new], dim=1), seconds, None
    if method in HF_METHODS:
        extra = {"prompt_lookup_num_tokens": 10} if method == "hf_prompt_lookup" else {}
        if method == "hf_assisted":
            extra = {"assistant_model": assistant}
        sequences = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos[0] if eos else 0, **extra,
        )
        return sequences, time.perf_counter() - start, None
    out = speculative_generate(
        model, None if method in ("ours_plain", "ours_lookup") else speculator, ids, mask,
        max_new_tokens=max_new_tokens, eos_token_id=eos, adaptive=policy if method == "ours_adaptive" else False,
        lookup=lookup if method in ("ours_lookup", "ours_adaptive") else 0,
    )
    return out.sequences, time.perf_counter() - start, out.stats


def run_bench(model, tokenizer, speculator, settings: BenchSettings, assistant=None, progress=None,
              other=None) -> dict:
    """Measure every method at every batch size on the same prompts; check that every
    greedy method emitted the base model's greedy tokens (bf16 near ties aside). `other`,
    the base model in the other dtype, runs the plain methods at batch 1 too, for the
    fastest plain decoding here (fastest_plain). On the llama.cpp backend (`model` a
    LlamaCppRunner) llama.cpp's own greedy decoding and prompt lookup are the peers, and
    the reference."""
    start = time.perf_counter()
    on_llama_cpp = isinstance(model, LlamaCppRunner)
    peer_methods = LLAMA_CPP_METHODS if on_llama_cpp else HF_METHODS
    greedy = peer_methods[0]  # the reference: every speedup is over it, every greedy output checked against it
    peers = {m: LlamaCppPeer(model.path, lookup=10 if m == "llama_cpp_lookup" else 0) for m in LLAMA_CPP_METHODS
             } if on_llama_cpp else None
    # code prompts are plain text, chat prompts message lists (encode_prompts templates those);
    # they take turns, so that batches cut by the budget leave the mix as it was
    prompts = settings.prompts or _take_turns(code_prompts(settings.n_code), chat_prompts()[: settings.n_chat])
    eos = as_runner(model).eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    methods = settings.methods or [m for m in (*peer_methods, *OUR_METHODS)
                                   if (m != "hf_assisted" or assistant is not None) and (m != "ours_lookup" or settings.lookup)]
    if other is not None and 1 in settings.batch_sizes:
        methods += [other_dtype_method(m, other.dtype) for m in OTHER_DTYPE_METHODS]
    # One policy learns across the run, as a server's would: tokens per step carry over
    # between batch sizes, costs are calibrated for each.
    policy = AdaptivePolicy(shape_menu(speculator.config, lookup=settings.lookup))
    raw = {m: {} for m in methods}
    divergences, accepted = [], []
    # every prompt once per batch size, and at least min_batches batches each, so no figure
    # rests on one run; the floor's methods go on alone up to floor_batches
    jobs = _schedule(settings, len(prompts))
    # warm-up: every method once at every batch size; on compiled graphs, which are built
    # for each cache capacity (a power of two past the prompt and the new tokens), also on
    # the shortest and the longest prompt at full length, so that no timed batch builds one
    shortest, longest = min(prompts, key=len), max(prompts, key=len)
    for b in settings.batch_sizes:
        warm = [((prompts * b)[:b], 4)]
        if _kernels(model) == "compiled":
            warm += [([shortest] * b, settings.max_new_tokens), ([longest] * b, settings.max_new_tokens)]
        for batch, new_tokens in warm:
            ids, mask = encode_prompts(tokenizer, batch, chat=False)
            for method in _methods_at(methods, b, settings.fixed_up_to):
                _run(method, model, speculator, assistant, policy, ids, mask, new_tokens, eos, settings.lookup, other,
                     peers)
    # before the timed batches, so that the budget covers it too; the warm-up calibrated the policy
    sweep = (_prompt_length_sweep(model, tokenizer, speculator, policy, settings, eos, greedy, peers)
             if settings.prompt_lengths else {})
    deadline = start + 60 * settings.minutes if settings.minutes else math.inf
    batch_seconds, skipped = {}, Counter()  # batch size -> seconds of each batch run; batches left out
    for done, (b, i, floor_only) in enumerate(jobs, start=1):
        so_far = batch_seconds.setdefault(b, [])
        if i >= REQUIRED_BATCHES and time.perf_counter() + sum(so_far) / len(so_far) > deadline:
            skipped[b] += 1
            if progress is not None:
                progress(done, len(jobs))
            continue
        tick = time.perf_counter()
        batch = [prompts[(i * b + j) % len(prompts)] for j in range(b)]
        ids, mask = (t.to(model.device) for t in encode_prompts(tokenizer, batch, chat=False))
        # a new order for every batch, among the methods that run at this batch size: a
        # rotation kept each method right after the same one (at batch > 1, ours_adaptive
        # after ours_fixed in 5 batches of 6), and the method after the most memory-hungry
        # one is not always timed alike
        # the other dtype's plain methods every other batch: plain decoding's pace hardly
        # depends on the prompt, and they are the slowest methods at batch 1
        here = [m for m in _methods_at(methods, b, settings.fixed_up_to) if (not floor_only or m in FLOOR_METHODS)
                and (m in (*PEERS, *OUR_METHODS) or i % 2 == 0)]
        order = [here[k] for k in torch.randperm(len(here), generator=torch.Generator().manual_seed(done)).tolist()]
        outputs = {}
        for method in order:
            outputs[method] = _run(method, model, speculator, assistant, policy, ids, mask,
                                   settings.max_new_tokens, eos, settings.lookup, other, peers)
        reference = outputs[greedy][0] if greedy in outputs else None
        for method, (sequences, seconds, stats) in outputs.items():
            entry = raw[method].setdefault(b, {"runs": {}, "steps": 0, "accepted": [], "shapes": Counter()})
            tokens = sum(_new_token_count(r, ids.size(1), set(eos)) for r in sequences.tolist())
            entry["runs"][i] = (tokens, seconds)
            if stats is not None:
                entry["steps"] += stats.row_steps
                entry["accepted"] += stats.accepted_lengths
                entry["shapes"].update(stats.shapes)
            if reference is not None and method != greedy and method in (*PEERS, *OUR_METHODS):
                for d in _divergences(model, ids, mask, sequences, reference, eos):
                    divergences.append({"method": method, "batch_size": b, **d})
        so_far.append(time.perf_counter() - tick)
        if progress is not None:
            progress(done, len(jobs))
    for entry in raw.get("ours_fixed", {}).values():
        accepted += entry["accepted"]

    results = {}
    for method, per_batch in raw.items():
        results[method] = {}
        for b, entry in per_batch.items():
            runs = entry["runs"]
            tokens, seconds = (sum(column) for column in zip(*runs.values()))
            # against the reference greedy method on the very batches this method ran
            base = raw[greedy].get(b) if greedy in raw else None
            base_runs = [base["runs"][i] for i in runs if i in base["runs"]] if base else []
            base_tokens, base_seconds = (sum(column) for column in zip(*base_runs)) if base_runs else (0, 0.0)
            heads = head_acceptance(entry["accepted"], speculator.config.n_predict)
            results[method][str(b)] = {
                "tokens_per_s": round(tokens / seconds, 2),
                "speedup": round(tokens / seconds / (base_tokens / base_seconds), 3) if base_runs else None,
                "batch_tokens_per_s": [round(t / s, 2) for t, s in runs.values()],
                "tokens_per_step": round(tokens / entry["steps"], 3) if entry["steps"] else None,
                "per_head_acceptance": [round(a, 3) for a in heads] if entry["accepted"] else None,
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "shapes": dict(entry["shapes"].most_common()),  # steps per tree shape, ours only
            }
    near = [d for d in divergences if d["near_tie"]]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe_machine(model.device),
        "settings": {**{k: v for k, v in settings.__dict__.items() if k != "prompts"},
                     "dtype": str(model.dtype).removeprefix("torch."), "kernels": _kernels(model),
                     "backend": "llama.cpp" if on_llama_cpp else "transformers", "baseline": greedy,
                     **({"gguf": model.path.name} if on_llama_cpp else {}),
                     "speculator": speculator.config.to_dict(), "n_prompts": len(prompts)},
        "results": results,
        "floor": adaptive_floor(results, greedy),
        "fastest_plain": fastest_plain(results, greedy),
        "mismatches": len(divergences) - len(near),
        "near_ties": len(near),
        "divergences": divergences,
        "accepted_lengths": accepted,
        "prompt_length": sweep,
        "batches": {str(b): {"run": len(batch_seconds.get(b, [])), "left_out": skipped[b]} for b in settings.batch_sizes},
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "adaptive_policy": policy.summary(),
    }


def _kernels(model) -> str:
    return "llama.cpp" if isinstance(model, LlamaCppRunner) else kernels_of(model)


def _divergences(model, ids, mask, sequences, reference, eos) -> list[dict]:
    """Where a method's greedy output leaves the reference's: with transformers, each
    judged a near tie or not (equality.find_divergences); on llama.cpp, each a mismatch."""
    if not isinstance(model, LlamaCppRunner):
        return [d.__dict__ for d in find_divergences(model, ids, mask, sequences, reference, eos)]
    found = []
    P, stops = ids.size(1), set(eos)
    for row, (ours, theirs) in enumerate(zip(sequences.tolist(), reference.tolist())):
        ours, theirs = ours[P : P + _new_token_count(ours, P, stops)], theirs[P : P + _new_token_count(theirs, P, stops)]
        index = next((i for i, (a, t) in enumerate(zip(ours, theirs)) if a != t), None)
        if index is not None:
            found.append({"row": row, "index": index, "ours": ours[index], "theirs": theirs[index], "gap": float("nan"),
                          "ulps": float("nan"), "near_tie": False})
    return found


def _take_turns(*kinds: list) -> list:
    """[a0, b0, a1, b1, ...]: the lists' items in turn, the rest of the longer one at the end."""
    return [x for group in itertools.zip_longest(*kinds) for x in group if x is not None]


def _schedule(settings: BenchSettings, n_prompts: int) -> list[tuple[int, int, bool]]:
    """The timed batches, (batch size, batch index, floor methods only): every prompt once
    per batch size and at least min_batches each, the floor's methods alone up to
    floor_batches; in rounds (every batch size's first batch, then every one's second, ...)
    so that a budget that ends the run early cuts every batch size alike."""
    jobs = []
    for b in settings.batch_sizes:
        every = max(settings.min_batches, n_prompts // b)
        jobs += [(b, i, i >= every) for i in range(max(every, settings.floor_batches))]
    return sorted(jobs, key=lambda job: (job[1], settings.batch_sizes.index(job[0])))


def adaptive_floor(results: dict, greedy: str = "hf_greedy") -> dict:
    """Per batch size: ours adaptive's speedup over the best plain method's (the `greedy`
    peer, or our loop with speculation off), the figure the adaptive policy must hold near 1."""
    if "ours_adaptive" not in results or greedy not in results:
        return {}
    plain = results.get("ours_plain", {})
    return {b: round(r["speedup"] / max(1.0, plain[b]["speedup"] if b in plain else 0.0), 3)
            for b, r in results["ours_adaptive"].items()}


def fastest_plain(results: dict, greedy: str = "hf_greedy") -> dict:
    """Per batch size: the fastest plain decoding measured (the `greedy` peer or
    ours_plain, in either dtype where the other ran), its tokens/s, and ours adaptive's
    tokens/s over it."""
    plain = [m for m in results if m.startswith((greedy, "ours_plain"))]
    fastest = {}
    for b, r in results.get("ours_adaptive", {}).items():
        here = {m: results[m][b]["tokens_per_s"] for m in plain if b in results[m]}
        if here:
            best = max(here, key=here.get)
            fastest[b] = {"method": best, "tokens_per_s": here[best],
                          "ours_adaptive": round(r["tokens_per_s"] / here[best], 3)}
    return fastest


def _prompt_length_sweep(model, tokenizer, speculator, policy, settings, eos, greedy="hf_greedy", peers=None) -> dict:
    """Batch 1: speedup of ours (fixed and adaptive) over the greedy peer as the prompt grows."""
    text = "\n".join(code_prompts(40, context_lines=60))
    ids_all = tokenizer(text, return_tensors="pt").input_ids
    sweep = {}
    for length in settings.prompt_lengths:
        ids = ids_all[:, -length:]
        mask = torch.ones_like(ids)
        if _kernels(model) == "compiled":  # this length's cache capacity has graphs of its own: built untimed
            for method in ("ours_fixed", "ours_adaptive"):
                _run(method, model, speculator, None, policy, ids, mask, settings.max_new_tokens, eos, settings.lookup)
        times = {}
        for method in (greedy, "ours_fixed", "ours_adaptive"):
            _, seconds, _ = _run(method, model, speculator, None, policy, ids, mask, settings.max_new_tokens, eos,
                                 settings.lookup, peers=peers)
            times[method] = seconds
        sweep[str(length)] = {m: round(times[greedy] / t, 3) for m, t in times.items() if m != greedy}
    return sweep


def write_report(report: dict, out: Path) -> None:
    """results.json, report.md and PNG plots in `out`."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    results = report["results"]
    machine = report["machine"]
    settings = report["settings"]
    peer = {"hf_greedy": "HF greedy", "llama_cpp_greedy": "llama.cpp greedy"}[settings.get("baseline", "hf_greedy")]
    weights = f"llama.cpp, {settings['gguf']}" if settings.get("backend") == "llama.cpp" else f"kernels {settings['kernels']}"
    lines = [
        "# mlpspec bench",
        "",
        f"{report['date']}, {hardware_line(machine, settings['dtype'])} ({weights}); {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
        f"transformers {machine['transformers']}; {report['settings']['n_prompts']} prompts, "
        f"{report['settings']['max_new_tokens']} new tokens, greedy."
        + (f" Command: `{report['command']}`." if report.get("command") else ""),
        "",
        f"| method | batch | tokens/s | speedup vs {peer} | tokens/step | per-head acceptance |",
        "|---|---|---|---|---|---|",
    ]
    for method, per_batch in results.items():
        for b, r in per_batch.items():
            heads = " ".join(f"{a:.2f}" for a in r["per_head_acceptance"]) if r["per_head_acceptance"] else ""
            step = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else ""
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else ""
            lines.append(f"| {method} | {b} | {r['tokens_per_s']:.1f} | {speedup} | {step} | {heads} |")
    lines += ["", f"Speedup: a method's tokens/s over {peer}'s, totals over the same batches (results.json "
              "also holds each batch's tokens/s)."]
    left_out = {b: n for b, n in report["batches"].items() if n["left_out"]}
    if left_out:
        lines += ["", f"The run took {report['minutes']:.1f} minutes; within its budget of "
                  f"{report['settings']['minutes']:g} (--minutes) these batch sizes ran fewer batches than planned: "
                  + ", ".join(f"batch {b} {n['run']} of {n['run'] + n['left_out']}" for b, n in left_out.items()) + "."]
    if report.get("fastest_plain"):
        lines += ["", f"Fastest plain decoding measured ({peer} or ours_plain, in either dtype where both ran), "
                  "and ours_adaptive over it: " + ", ".join(
                      f"batch {b} {f['method']} {f['tokens_per_s']:.1f} tokens/s, ours_adaptive {f['ours_adaptive']:.2f}x"
                      for b, f in report["fastest_plain"].items()) + "."]
    if report.get("floor"):
        lines += ["", f"Floor, ours_adaptive over the best plain method ({peer} or ours_plain): " + ", ".join(
            f"batch {b} {f:.3f}" for b, f in report["floor"].items()) + "."]
    if "ours_adaptive" in results:
        lines += ["", "Steps of ours_adaptive by tree shape ([top-k per head]x candidates; [top-k per head]~N: the "
                  "likeliest N nodes of that tree at most, as many as pay; lookupN: a prompt-lookup branch of N "
                  "tokens):", ""]
        lines += [f"- batch {b}: " + ", ".join(f"{shape} {n}" for shape, n in r["shapes"].items())
                  for b, r in results["ours_adaptive"].items()]
    lines += ["", f"Greedy outputs checked against {peer}: {report['mismatches']} mismatches, "
              f"{report['near_ties']} near ties (bf16 logits within a few ulps)."]
    for d in report["divergences"]:
        lines.append(f"- {d['method']} batch {d['batch_size']} row {d['row']}: new token {d['index']}, "
                     f"ours {d['ours']} vs {peer} {d['theirs']}, logit gap {d['gap']:.4f} ({d['ulps']:.1f} ulps)"
                     f"{'' if d['near_tie'] else ' MISMATCH'}")
    if report["prompt_length"]:
        lines += ["", "| prompt tokens | ours fixed speedup | ours adaptive speedup |", "|---|---|---|"]
        for length, r in report["prompt_length"].items():
            lines.append(f"| {length} | {r['ours_fixed']:.2f}x | {r['ours_adaptive']:.2f}x |")
    lines += ["", "Adaptive policy at the end (shapes used, and calibrated step costs per batch size):", "",
              "```", report["adaptive_policy"], "```"]
    lines.append("")
    (out / "report.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, per_batch in results.items():
        sizes = [int(b) for b in per_batch]
        axes[0].plot(sizes, [per_batch[str(b)]["tokens_per_s"] for b in sizes], marker="o", label=method)
        axes[1].plot(sizes, [per_batch[str(b)]["speedup"] for b in sizes], marker="o", label=method)
    all_sizes = sorted({int(b) for per_batch in results.values() for b in per_batch})
    for ax, label in zip(axes, ("tokens/s", f"speedup over {peer}")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_sizes, [str(b) for b in all_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "batch_size.png", dpi=120)
    plt.close(fig)
    if report["prompt_length"]:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        lengths = [int(n) for n in report["prompt_length"]]
        for method in ("ours_fixed", "ours_adaptive"):
            ax.plot(lengths, [report["prompt_length"][str(n)][method] for n in lengths], marker="o", label=method)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("prompt tokens (batch 1)")
        ax.set_ylabel(f"speedup over {peer}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "prompt_length.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    n_predict = report["settings"]["speculator"]["n_predict"]
    ax.hist(report["accepted_lengths"], bins=[x - 0.5 for x in range(n_predict + 2)], rwidth=0.8)
    ax.set_xlabel("accepted candidate tokens per step (ours, fixed tree)")
    ax.set_ylabel("row-steps")
    fig.tight_layout()
    fig.savefig(out / "accepted_length.png", dpi=120)
    plt.close(fig)
