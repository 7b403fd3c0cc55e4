"""The `mlpspec` command. It parses arguments and calls the library; nothing else."""

from __future__ import annotations

import argparse
import sys

from .errors import MLPSpecError


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def cmd_info(args) -> None:
    from .base import check_pair, describe_base, load_base, speculator_config_for
    from .checkpoint import load_speculator
    from .model import MLPSpeculator

    model, _ = load_base(args.base, dtype=args.dtype)
    base = describe_base(model)
    print(f"base model: {args.base or 'SmolLM2-135M-Instruct (embedded default)'}")
    print(
        f"  {base['class']}: hidden size {base['hidden_size']}, {base['layers']} layers, "
        f"vocab {base['vocab_size']}, {_millions(base['parameters'])} parameters, {base['dtype']}"
    )
    if args.speculator is None:
        try:
            speculator = load_speculator(dtype=model.dtype)
            origin = "shipped default"
        except MLPSpecError as e:
            speculator = MLPSpeculator(speculator_config_for(model)).to(model.dtype)
            origin = f"freshly initialised, untrained ({e})"
    else:
        speculator = load_speculator(args.speculator, dtype=model.dtype)
        origin = args.speculator
    check_pair(model, speculator)
    cfg = speculator.config
    print(f"speculator: {origin}")
    print(
        f"  MLPSpeculator: emb_dim {cfg.emb_dim}, inner_dim {cfg.width}, n_predict {cfg.n_predict}, "
        f"top_k_tokens_per_head {cfg.top_k_tokens_per_head}, n_candidates {cfg.n_candidates}, "
        f"tie_weights {cfg.tie_weights}, scale_input {cfg.scale_input}"
    )
    print(
        f"  {_millions(speculator.num_parameters())} parameters "
        f"({speculator.num_parameters() / base['parameters']:.2f}x the base model)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlpspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the base model and speculator configs and sizes")
    info.add_argument("--base", help="HF model id or folder (default: embedded SmolLM2-135M-Instruct)")
    info.add_argument("--speculator", help="speculator folder or hub id (default: the shipped one)")
    info.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    info.set_defaults(func=cmd_info)
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
