"""The `mlpspec` command. It parses arguments and calls the library; nothing else."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .errors import MLPSpecError


DEFAULT_SERVING_TARGETS = "mlpspec,mlpspec_plain,transformers_cb"  # (transformers_cb left out on llama.cpp)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _speculator_for(model, name_or_path: str | None, default_base: bool):
    """The named speculator; else, for the embedded default base model, the shipped
    default; else (saying so) a freshly initialised one, so the pipeline can be seen
    working before any training."""
    import torch

    from .base import check_pair, speculator_config_for
    from .checkpoint import load_speculator
    from .model import MLPSpeculator

    if name_or_path is not None:
        speculator, origin = load_speculator(name_or_path, dtype=model.dtype, base=model), name_or_path
    else:
        try:
            if not default_base:
                raise MLPSpecError("the shipped speculator is for the embedded default base model")
            speculator, origin = load_speculator(dtype=model.dtype, base=model), "shipped default"
        except MLPSpecError as e:
            # sharing the base model's embedding and LM head keeps a stand-in for a large
            # model small: only the transitions and norms are new
            torch.manual_seed(0)
            speculator = MLPSpeculator(speculator_config_for(model, tie_base_embeddings=True)).to(model.dtype)
            speculator.attach_base(model)  # the tied tensors exist from here on: then the rest joins them
            speculator.to(model.device).eval()
            origin = f"freshly initialised, untrained: it will rarely guess right ({e})"
    check_pair(model, speculator)
    return speculator, origin


def _load(args, speculate: bool = True):
    """The base model as the command's --base, --dtype, --device and --kernels say; for
    --dtype auto, one line on stderr says which dtype it chose and why."""
    from .base import chosen_backend, load_base, pick_dtype

    if chosen_backend(args.base, args.backend) == "llama.cpp":
        if args.dtype not in ("auto", "float32") or args.kernels != "auto" or args.device not in ("auto", "cpu"):
            raise MLPSpecError("--dtype, --kernels and --device are for the transformers backend: on llama.cpp "
                               "the GGUF file's own types run on the CPU")
        print(f"[backend: llama.cpp, {Path(args.base).name if args.base else 'the embedded default GGUF file'}]",
              file=sys.stderr)
        return load_base(args.base, backend="llama.cpp")
    choice = pick_dtype(args.base, args.dtype, args.device, args.kernels, speculate=speculate)
    if args.dtype == "auto":
        print(f"[dtype auto: {choice.name}. {choice.reason}]", file=sys.stderr)
    return load_base(args.base, dtype=choice.dtype, device=args.device, kernels=args.kernels)


def cmd_info(args) -> None:
    from .base import describe_base, load_base

    model, _ = load_base(args.base, dtype=args.dtype, device=args.device)
    base = describe_base(model)
    print(f"base model: {args.base or 'SmolLM2-135M-Instruct (embedded default)'}")
    print(
        f"  {base['class']}: hidden size {base['hidden_size']}, {base['layers']} layers, "
        f"vocab {base['vocab_size']}, {_millions(base['parameters'])} parameters, {base['dtype']}, on {model.device}"
    )
    speculator, origin = _speculator_for(model, args.speculator, args.base is None)
    cfg = speculator.config
    print(f"speculator: {origin}")
    print(
        f"  MLPSpeculator: emb_dim {cfg.emb_dim}, inner_dim {cfg.width}, n_predict {cfg.n_predict}, "
        f"top_k_tokens_per_head {cfg.top_k_tokens_per_head}, n_candidates {cfg.n_candidates}, "
        f"tie_weights {cfg.tie_weights}, scale_input {cfg.scale_input}"
    )
    if cfg.tie_base_embeddings or cfg.draft_vocab_size or cfg.feature_layers:
        print(
            f"  mlpspec extensions: tie_base_embeddings {cfg.tie_base_embeddings}, emb_adapter {cfg.emb_adapter}, "
            f"heads score {cfg.head_size} tokens (draft vocabulary {cfg.draft_vocab_size or 'off'}), "
            f"feature layers {cfg.feature_layers or 'none'}"
        )
    own = sum(p.numel() for p in speculator.parameters() if p.requires_grad)
    print(
        f"  {_millions(own)} parameters of its own ({own / base['parameters']:.2f}x the base model)"
    )


def cmd_generate(args) -> None:
    import torch
    from transformers import TextStreamer

    from .decode import remember_calibration, remembered_policy
    from .generate import speculative_generate
    from .llama_cpp import LlamaCppRunner
    from .text import decode_new_tokens, encode_prompts, read_prompt_file

    if bool(args.prompt) == bool(args.batch_file):
        raise MLPSpecError("give prompts as arguments or with --batch-file, not both or neither")
    prompts = list(args.prompt) if args.prompt else read_prompt_file(args.batch_file)
    model, tokenizer = _load(args, speculate=not args.no_speculate)
    speculator = None
    if not args.no_speculate:
        speculator, origin = _speculator_for(model, args.speculator, args.base is None)
        print(f"[speculator: {origin}]", file=sys.stderr)
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, chat=args.chat)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if len(prompts) == 1 else None
    lookup = 0 if args.no_speculate else args.lookup
    policy, calibration = args.adaptive, None
    if args.adaptive and speculator is not None:  # step costs measured by an earlier call on this machine
        policy, file = remembered_policy(model, speculator, lookup, recalibrate=args.recalibrate)
        calibration = policy.calibration()
    out = speculative_generate(
        model,
        speculator,
        input_ids,
        attention_mask,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator(model.device).manual_seed(args.seed),
        streamer=streamer,
        adaptive=policy,
        lookup=lookup,
    )
    if calibration is not None and policy.calibration() != calibration:
        remember_calibration(policy, file)
    if streamer is None:
        texts = decode_new_tokens(tokenizer, out.sequences, input_ids.size(1), out.stats.emitted)
        for i, text in enumerate(texts):
            print(f"--- {i + 1}\n{text}")
    if args.stats:
        mode = "plain decoding" if speculator is None else "adaptive speculative" if args.adaptive else "speculative"
        runtime = "llama.cpp" if isinstance(model, LlamaCppRunner) else str(model.dtype).removeprefix("torch.")
        print(f"[{mode}, {runtime}] {out.stats.summary()}", file=sys.stderr)
        if out.stats.shapes and args.adaptive:
            shapes = ", ".join(f"{shape} {n}" for shape, n in sorted(out.stats.shapes.items(), key=lambda kv: -kv[1]))
            print(f"[tree shapes chosen, steps each: {shapes}]", file=sys.stderr)


def cmd_train(args) -> None:
    from dataclasses import fields

    from .train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["data"] = values["data"] or ["default"]
    values["progress"] = not args.no_progress
    out = train(TrainConfig(**values))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"speculator written to {out} (train_log.jsonl beside it)")


def cmd_bench(args) -> None:
    from tqdm import tqdm

    import torch

    from .base import chosen_backend, load_base
    from .bench import BenchSettings, named_prompts, run_bench, write_report

    if args.serving:
        return _serving_bench(args)
    on_llama_cpp = chosen_backend(args.base, args.backend) == "llama.cpp"
    if on_llama_cpp and args.assistant:
        raise MLPSpecError("--assistant is transformers' assisted generation: not on the llama.cpp backend")
    if args.minutes < 0:
        raise MLPSpecError(f"--minutes must be >= 0 (0: no budget), got {args.minutes:g}")
    from .decode import DEFAULT_LOOKUP

    lookup = DEFAULT_LOOKUP if args.lookup is None else args.lookup  # --serving's default is serve's, 0
    # llama.cpp's own decoding (the peers there) runs one row at a time: batch 1 unless asked
    sizes = [int(b) for b in (args.batch_sizes or ("1" if on_llama_cpp else "1,2,4,8,16")).split(",")]
    lengths = [int(n) for n in args.prompt_lengths.split(",")] if args.prompt_lengths else []
    settings = BenchSettings(batch_sizes=sizes, max_new_tokens=args.max_new_tokens, prompt_lengths=lengths,
                             prompts=named_prompts(args.prompts) if args.prompts else None, lookup=lookup,
                             minutes=args.minutes or None)
    if args.quick:
        settings = BenchSettings(batch_sizes=[1, 4], max_new_tokens=32, n_code=2, n_chat=2, prompt_lengths=[],
                                 prompts=settings.prompts[:4] if settings.prompts else None, lookup=lookup,
                                 floor_batches=6, minutes=settings.minutes)
    model, tokenizer = _load(args)
    speculator, origin = _speculator_for(model, args.speculator, args.base is None)
    assistant = load_base(args.assistant, dtype=model.dtype, device=args.device)[0] if args.assistant else None
    other = None
    if model.device.type == "cpu" and not args.one_dtype and not on_llama_cpp:  # the plain methods in the other
        # dtype too, at batch 1
        other_dtype = torch.bfloat16 if model.dtype == torch.float32 else torch.float32
        other = load_base(args.base, dtype=other_dtype, device=args.device, kernels=args.kernels)[0]
    print(f"[speculator: {origin}]", file=sys.stderr)
    bar = tqdm(desc="bench", unit="batch")
    report = run_bench(model, tokenizer, speculator, settings, assistant=assistant, other=other,
                       progress=lambda done, total: (setattr(bar, "total", total), bar.update(1)))
    bar.close()
    write_report({**report, "command": _command_line()}, args.out)
    print((Path(args.out) / "report.md").read_text())
    print(f"results.json, report.md and plots in {args.out}")


def _command_line() -> str:
    """This process's command as a user would type it, for a report to name what made it."""
    return shlex.join(["mlpspec", *sys.argv[1:]])


def _serving_bench(args) -> None:
    from tqdm import tqdm

    from .base import chosen_backend
    from .serving_bench import ServingSettings, run_serving_bench, serving_prompts, write_serving_report

    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise MLPSpecError(f"--rates must be comma-separated requests per second, got {args.rates!r}") from None
    targets = tuple(args.targets.split(","))
    if chosen_backend(args.base, args.backend) == "llama.cpp":
        if args.targets != DEFAULT_SERVING_TARGETS and "transformers_cb" in targets:
            raise MLPSpecError("transformers_cb is transformers' continuous batching: not on the llama.cpp backend")
        targets = tuple(t for t in targets if t != "transformers_cb")
    settings = ServingSettings(rates=rates, requests=args.requests, max_tokens=args.max_new_tokens,
                               max_batch=args.max_batch, lookup=args.lookup or 0, targets=targets,
                               repeats=args.repeats, lengths=args.lengths)
    model, tokenizer = _load(args)
    speculator, origin = _speculator_for(model, args.speculator, args.base is None)
    print(f"[speculator: {origin}]", file=sys.stderr)
    asks = serving_prompts(tokenizer)
    bar = tqdm(total=len(settings.rates) * len(settings.targets) * settings.repeats, desc="serving bench", unit="run")
    report = run_serving_bench(model, tokenizer, speculator, asks, settings, progress=lambda *_: bar.update(1))
    bar.close()
    write_serving_report({**report, "command": _command_line()}, Path(args.out))
    print((Path(args.out) / "serving.md").read_text())
    print(f"serving.json, serving.md and serving.png in {args.out}")


def cmd_prompts(args) -> None:
    from tqdm import tqdm

    from .base import load_base
    from .data import write_self_written_prompts

    if Path(args.out).exists():
        raise MLPSpecError(f"{args.out} exists; give a new file")
    model, tokenizer = load_base(args.base, dtype=args.dtype, device=args.device)
    bar = tqdm(total=args.n, desc="prompts", unit="prompt")
    write_self_written_prompts(args.out, model, tokenizer, args.n, batch_size=args.batch_size,
                               max_tokens=args.max_tokens, seed=args.seed, leads=args.lead,
                               progress=lambda kept, n: bar.update(kept - bar.n))
    bar.close()
    print(f"{args.n} prompts written by the base model -> {args.out}")


def cmd_export(args) -> None:
    from .export import export_for_base

    out = export_for_base(args.speculator, args.base, args.format, args.out, dtype=args.dtype)
    print(f"{args.format} export of {args.speculator or 'the shipped default'} written to {out}")


def cmd_serve(args) -> None:
    from .base import DEFAULT_BASE_NAME
    from .serve import serve

    if args.engine == "vllm":
        return _serve_with_vllm(args)
    if args.vllm_args or args.num_speculative_tokens or args.tensor_parallel_size != 1:
        raise MLPSpecError("--num-speculative-tokens, --tensor-parallel-size and arguments after -- are for "
                           "--engine vllm")
    model, tokenizer = _load(args, speculate=not args.no_speculate)
    speculator = None
    if not args.no_speculate:
        speculator, origin = _speculator_for(model, args.speculator, args.base is None)
        print(f"[speculator: {origin}]", file=sys.stderr)
    serve(model, tokenizer, speculator, args.model_id or args.base or DEFAULT_BASE_NAME,
          host=args.host, port=args.port, max_batch=args.max_batch, lookup=0 if args.no_speculate else args.lookup,
          max_waiting=args.max_waiting)


def _serve_with_vllm(args) -> None:
    from .base import cache_dir, default_base_folder
    from .vllm_serve import VLLMServeConfig, export_once, installed_vllm, serve_with_vllm

    if args.kernels != "auto" or args.device != "auto" or args.lookup or args.backend != "auto":
        raise MLPSpecError("--kernels, --device, --backend and --lookup are for mlpspec's own engine; vLLM chooses "
                           "its own")
    installed_vllm()  # before any work: one line where vLLM is absent or of a version the drafter does not know
    speculator = None if args.no_speculate else export_once(args.speculator, args.base, cache_dir())
    serve_with_vllm(VLLMServeConfig(
        base=args.base or str(default_base_folder()), speculator=speculator,
        num_speculative_tokens=args.num_speculative_tokens, host=args.host, port=args.port, dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=args.max_batch,
        served_model_name=args.model_id, extra=args.vllm_args))


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, spelled with dashes, typed by its default."""
    from dataclasses import MISSING, fields

    from .train import CHOICES, TrainConfig

    helps = {
        "out": "output folder: the speculator, checkpoints, stage-2 data, train_log.jsonl",
        "base": "HF model id or folder (default: embedded SmolLM2-135M-Instruct)",
        "data": "text data: a file, a folder, a hub dataset name, or 'default' (repeatable)",
        "tie_base_embeddings": "share the base model's embedding and LM head (frozen, not stored)",
        "dtype": "base model dtype; bfloat16 also runs the speculator under autocast",
        "targets": "what the heads learn: the data's next tokens, the base model's own greedy choices, "
                   "or its whole next-token distribution (distill: a KL loss)",
        "resume": "continue the run in --out from its latest checkpoint",
        "token_conditioning": "drop the sampled token from every stage (a Medusa-style speculator)",
        "stage2_prompts": "a JSONL prompt file ({\"prompt\": ...} or {\"messages\": [...]} lines) that stage 2 "
                          "answers, in place of prompts cut from --data; 'self': chat prompts the base model "
                          "writes itself (see `mlpspec prompts`)",
        "emb_adapter": "with --tie-base-embeddings: read the base embedding through a learned map "
                       "(started at the identity), which may also widen it to --inner-dim",
        "device": "where training runs: auto (this process's GPU, cuda:LOCAL_RANK under torchrun, where there "
                  "is one; else the CPU), or a torch device such as cpu or cuda:1",
        "feature_layers": "comma-separated base layers (e.g. 8,16,24) whose states the first stage also reads, "
                          "each through a learned map started at zero (not exportable)",
        "text_field": "the field of a JSON/JSONL or hub dataset row that holds its text (default %(default)s)",
        "n_predict": "heads: tokens the speculator guesses ahead each step (default %(default)s)",
        "inner_dim": "the speculator's width; 0 (default): the base model's hidden size",
        "tie_weights": "every stage shares one embedding, norm, head and (after the first) projection, "
                       "as the authors' tied speculators do (fewer parameters)",
        "scale_input": "the first stage reads the base state RMS-normed and divided by sqrt(2), as the "
                       "authors' llama2-70b speculator does",
        "draft_vocab_size": "heads score only this many tokens, the training data's most frequent (a "
                            "smaller, faster head); 0 (default): the whole vocabulary",
        "init_from": "start from this speculator folder's weights (a fresh optimizer and schedule)",
        "seq_len": "tokens per training window (default %(default)s)",
        "batch_size": "windows per step per process (default %(default)s)",
        "grad_accum": "steps whose gradients add up before each update (default %(default)s)",
        "lr": "peak learning rate: linear warm-up, cosine to 0.1x in stage 1, 0.1x to 0.01x in stage 2 "
              "(default %(default)s)",
        "warmup_steps": "stage 1's warm-up steps (default %(default)s)",
        "weight_decay": "AdamW weight decay (default %(default)s)",
        "grad_clip": "clip the gradient norm to this (default %(default)s)",
        "stage1_steps": "optimizer steps on text (default %(default)s)",
        "stage2_steps": "optimizer steps on the base model's own generations; 0 (default): no stage 2",
        "seed": "seeds data order, initialisation and stage-2 sampling (default %(default)s)",
        "stage2_rows": "generations stage 2 makes and trains on (default %(default)s)",
        "stage2_prompt_length": "tokens of --data each stage-2 (and held-out) prompt takes (default %(default)s)",
        "stage2_new_tokens": "tokens the base model generates for each stage-2 prompt (default %(default)s)",
        "stage2_greedy": "generate stage 2's data greedily (default: sampled at temperature 1)",
        "stage2_dir": "where stage 2's shards are written (default OUT/stage2); share one between runs",
        "generate_batch_size": "prompts generated together in stage 2 (default %(default)s)",
        "save_every": "steps between checkpoints, which --resume continues from (default %(default)s)",
        "log_every": "steps between lines of train_log.jsonl (default %(default)s)",
        "eval_rows": "held-out prompts whose greedy continuations score per-head accuracy and chain "
                     "acceptance at each checkpoint (default %(default)s)",
        "eval_new_tokens": "tokens of each held-out continuation (default %(default)s)",
        "fsdp_base": "shard the frozen base model with FSDP under torchrun (for bases too big for one GPU)",
    }
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        if f.name == "progress":
            parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        elif f.name == "data":
            parser.add_argument(flag, action="append", help=helps[f.name])
        elif f.name == "feature_layers":
            parser.add_argument(flag, type=_layer_list, default=[], help=helps[f.name])
        elif default is True:  # on by default: the flag turns it off
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                help=helps[f.name])
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=helps[f.name])
        elif f.name in CHOICES:
            parser.add_argument(flag, default=default, choices=CHOICES[f.name], help=helps[f.name])
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, required=f.name == "out", help=helps[f.name])


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="where the models run: auto (the GPU where there is one, "
                                                         "else the CPU), cpu, cuda:1, ...")


def _add_speed(parser: argparse.ArgumentParser) -> None:
    """--dtype (auto by default) and --kernels, for the commands that decode."""
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto (default): the fastest here, timed once per machine and model and kept in the "
                             "user cache; float32 reproduces transformers' float32 greedy output token for token")
    parser.add_argument("--kernels", default="auto", choices=["auto", "onednn", "aten", "compiled"],
                        help="CPU matmuls: auto (default) packs the base model's linear weights for oneDNN where "
                             "it can (a second copy of them) and sends passes there where that is faster here "
                             "(timed once per machine and model, kept in the user cache); onednn always does; aten "
                             "leaves PyTorch's own choice; compiled runs decoding "
                             "passes on torch.compile graphs, one per batch size and tree width, built on first use "
                             "(about 40 s each for SmolLM2-135M on 2 cores)")
    parser.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"],
                        help="what runs the base model: transformers, or llama.cpp for a GGUF file (--base FILE.gguf; "
                             "without --base, the embedded default's own Q4_1 file). auto (default): llama.cpp for a "
                             ".gguf file where llama-cpp-python is installed (scripts/install_llama_cpp.sh)")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(layer) for layer in text.split(",") if layer.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value: 'x'"
    return parse


_non_negative, _positive = _int_at_least(0), _int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    from .decode import DEFAULT_LOOKUP
    from .serving_bench import LENGTHS

    parser = argparse.ArgumentParser(
        prog="mlpspec", description="Faster, lossless text generation with MLP speculators: train one for a causal "
        "LM, generate, benchmark and serve with it.", epilog="`mlpspec COMMAND --help` explains every flag of a command.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the base model and speculator configs and sizes")
    info.add_argument("--base", help="HF model id or folder (default: embedded SmolLM2-135M-Instruct)")
    info.add_argument("--speculator", help="speculator folder or hub id (default: the shipped one)")
    info.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="dtype the models load in (default %(default)s)")
    _add_device(info)
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate text, speculatively (losslessly)")
    gen.add_argument("prompt", nargs="*", help="prompt text (several make a batch)")
    gen.add_argument("--batch-file", help='JSONL, one {"prompt": ...} or {"messages": [...]} per line')
    gen.add_argument("--base", help="HF model id or folder (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--speculator", help="speculator folder or hub id (default: the shipped one)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=None, help="with --temperature: sample among the k likeliest tokens")
    gen.add_argument("--top-p", type=float, default=None,
                     help="with --temperature: sample among the likeliest tokens whose probabilities add up to p")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    gen.add_argument("--no-speculate", action="store_true", help="plain decoding through the same loop")
    gen.add_argument("--lookup", type=_non_negative, default=DEFAULT_LOOKUP,
                     help=f"tokens of the prompt-lookup branch beside the speculator's tree (default {DEFAULT_LOOKUP}; 0: none)")
    gen.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                     help="pick each step's tree shape, or none, for the most tokens/s (default on)")
    gen.add_argument("--recalibrate", action="store_true",
                     help="time the adaptive policy's steps again, not reusing the costs an earlier call measured "
                          "on this machine (kept in the user cache)")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--stats", action="store_true", help="print tokens/step, tokens/s, per-head acceptance")
    _add_speed(gen)
    _add_device(gen)
    gen.set_defaults(func=cmd_generate)

    be = sub.add_parser("bench", help="measure every decoding method at every batch size, with plots")
    be.add_argument("--base", help="HF model id or folder (default: embedded SmolLM2-135M-Instruct)")
    be.add_argument("--speculator", help="speculator folder or hub id (default: the shipped one)")
    be.add_argument("--prompts", help="JSONL prompt file, or 'code' or 'chat': 12 prompts of that kind (default: "
                                      "6 unseen code and 6 chat prompts)")
    be.add_argument("--one-dtype", action="store_true",
                    help="no plain decoding in the other dtype at batch 1 (by default, on the CPU, HF greedy and "
                         "ours_plain also run in float32 beside bfloat16 or back, for the fastest plain decoding)")
    be.add_argument("--max-new-tokens", type=int, default=40,
                    help="tokens each prompt generates (default %(default)s); with --serving, the mean of "
                         "each request's max_tokens (see --lengths)")
    be.add_argument("--batch-sizes", help="comma-separated (default 1,2,4,8,16; on the llama.cpp backend 1, since "
                                         "llama.cpp's own decoding there runs one row at a time)")
    be.add_argument("--prompt-lengths", default="64,256,1024", help="batch-1 prompt-length sweep ('' to skip)")
    be.add_argument("--minutes", type=float, default=9.0,
                    help="time budget: past 2 batches per batch size, only batches that end within it run (0: no budget)")
    be.add_argument("--assistant", help="a draft model for HF assisted generation")
    be.add_argument("--lookup", type=_non_negative,
                    help=f"prompt-lookup branch of ours_lookup and ours_adaptive (default {DEFAULT_LOOKUP}; 0: none); "
                         "with --serving, the speculating server's (serve --lookup; default 0 there too)")
    _add_speed(be)
    _add_device(be)
    be.add_argument("--out", default="bench", help="folder for results.json, report.md and plots")
    be.add_argument("--quick", action="store_true", help="2 code + 2 chat prompts, batch 1 and 4, 32 tokens")
    be.add_argument("--serving", action="store_true",
                    help="the serving benchmark instead: Poisson arrivals at --rates to `mlpspec serve` with "
                         "speculation on and off, and to transformers' continuous batching")
    be.add_argument("--rates", default="0.5,1,2", help="--serving: requests per second, comma-separated")
    be.add_argument("--requests", type=_positive, default=24, help="--serving: requests per rate and target")
    be.add_argument("--max-batch", type=_positive, default=16, help="--serving: the server's --max-batch")
    be.add_argument("--targets", default=DEFAULT_SERVING_TARGETS,
                    help="--serving: which of mlpspec, mlpspec_plain, transformers_cb")
    be.add_argument("--repeats", type=_positive, default=1,
                    help="--serving: rounds over all targets, taking turns (each reports its median run; "
                         "speculation on / off is the median of the rounds' paired ratios)")
    be.add_argument("--lengths", choices=LENGTHS, default="mixed",
                    help="--serving: each request's max_tokens uniform in [N/3, 5N/3] for --max-new-tokens N "
                         "(mixed, seeded, the same for every target) or N for all (fixed)")
    be.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with batched speculative decoding")
    sv.add_argument("--base", help="HF model id or folder (default: embedded SmolLM2-135M-Instruct)")
    sv.add_argument("--speculator", help="folder or hub id (default: the shipped default speculator)")
    sv.add_argument("--no-speculate", action="store_true", help="plain decoding (the baseline)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    sv.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    sv.add_argument("--max-waiting", type=int, default=256,
                    help="most requests queued for a row; past it a request is answered 503 with Retry-After")
    sv.add_argument("--lookup", type=_non_negative, default=0,
                    help="tokens of the prompt-lookup branch the policy may add (default 0, none: under load, in "
                         f"batches of up to 16, the load check measured 0.93-0.97x with it; generate and bench use "
                         f"{DEFAULT_LOOKUP})")
    sv.add_argument("--model-id", help="the model name clients send (default: the base model's)")
    sv.add_argument("--engine", default="mlpspec", choices=["mlpspec", "vllm"],
                    help="mlpspec (default): our own engine on this machine; vllm: vLLM's server with the "
                         "speculator (mlpspec's plugin; needs vLLM 0.32, see docs/vllm-plugin.md), exported "
                         "to vLLM's format once if it is not already")
    sv.add_argument("--num-speculative-tokens", type=_non_negative, default=0,
                    help="vllm: drafts per step (default: all the speculator's heads)")
    sv.add_argument("--tensor-parallel-size", type=_positive, default=1, help="vllm: GPUs to shard the base model over")
    sv.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARG", help="vllm: more `vllm serve` arguments, after --")
    _add_speed(sv)
    _add_device(sv)
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="write a speculator in a serving engine's format (ibm, arctic, vllm)")
    ex.add_argument("--speculator", help="folder or hub id (default: the shipped default speculator)")
    ex.add_argument("--format", required=True, choices=["ibm", "arctic", "vllm"],
                    help="ibm: the authors' released format (vLLM v0, TGIS, fms-extras); arctic: "
                         "ArcticInference's; vllm: mlpspec's own vLLM plugin (docs/vllm-plugin.md)")
    ex.add_argument("--out", required=True, help="a new folder")
    ex.add_argument("--base", help="the base model, for tied embeddings and the config's base fields "
                                   "(default: the embedded default)")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights (default %(default)s)")
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("prompts", help="have the base model write chat prompts itself, for --stage2-prompts")
    pr.add_argument("--out", required=True, help="a new JSONL prompt file")
    pr.add_argument("--n", type=_positive, required=True, help="how many distinct prompts")
    pr.add_argument("--base", help="HF model id or folder (default: embedded SmolLM2-135M-Instruct)")
    pr.add_argument("--max-tokens", type=_positive, default=64, help="longest prompt; longer ones are dropped")
    pr.add_argument("--batch-size", type=_positive, default=16, help="prompts written together (default %(default)s)")
    pr.add_argument("--seed", type=int, default=0, help="seeds the sampling (default %(default)s)")
    pr.add_argument("--lead", action="append", metavar="TEXT",
                    help="words every request begins with, to steer its topic (e.g. --lead 'In Python,' "
                         "--lead 'In SQL,'); repeat it and the batches take each in turn")
    pr.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="base model dtype (default %(default)s)")
    _add_device(pr)
    pr.set_defaults(func=cmd_prompts)

    tr = sub.add_parser("train", help="train a speculator for a base model (stage 1 on text, stage 2 on its own output)")
    _add_train_options(tr)
    tr.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers draws a bar for every weight load; on a one-second load it is only noise
    # between our own lines. (The GGUF conversion prints its own line.)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except MLPSpecError as e:
        print(f"mlpspec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
