"""What machine this is, and which dtype and matmul routing run a base model fastest on it.

CPUs differ in what decides speculation. On a 2-core AMD EPYC with native bfloat16
(AVX512-BF16), a bfloat16 pass of SmolLM2-135M over 16 tree nodes cost 1.3x a one-token
pass on PyTorch's kernels; with its and oneDNN's kernels held to AVX2 on the same CPU,
where bfloat16 matmuls are emulated, 6.3x, and float32 was then the faster dtype for trees
(kernels.py narrowed that gap). So no dtype is right everywhere: `choose_dtype` times both
on the machine at hand (a second or two, kept per machine and model), `choose_routing` does
the same for routing the linears to oneDNN (kernels.py), which paid on that EPYC and cost
more than it saved on a 2-core Intel Xeon, and every figure mlpspec reports carries
`describe_machine`.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import MLPSpecError
from .fileio import atomic_write, keyed_file

# What the probe times: a one-token pass (plain decoding) and a pass over this many tree
# nodes (a step of the shipped default's tree), after a context of PROBE_CONTEXT tokens.
PROBE_NODES = 16
PROBE_CONTEXT = 128
# The tokens such a step yields, to weigh its cost against a plain step's: the shipped
# default made 2.0-2.6 tokens/step with its fixed tree on unseen code and chat at batch 1.
PROBE_TREE_TOKENS = 2.5
# float32 reproduces transformers' float32 greedy output token for token; it is kept unless
# bfloat16 is faster by more than this share.
EXACT_MARGIN = 0.05
# A class of passes leaves oneDNN's packed linears for PyTorch's own kernels only where those
# are this much faster: where the two are close, the routing stays.
ROUTING_MARGIN = 0.05
# The environment variables that hold PyTorch's and oneDNN's kernels to an older ISA (an
# AVX512 machine then runs as an AVX2-only one would) and MKL's.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
        if flags and name:
            break
    return name, flags


def describe_machine(device: torch.device | str = "cpu") -> dict:
    """The hardware a figure was measured on: the CPU's model, PyTorch's kernel capability
    (torch.backends.cpu.get_cpu_capability), whether the CPU has native bfloat16, threads,
    any variable holding kernels to an older ISA, and the GPU where one is used."""
    import transformers

    device = torch.device(device)
    name, flags = _cpu_info()
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None
    isa = {key: os.environ[key] for key in ISA_VARIABLES if key in os.environ}
    return {
        "cpu": name,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16 and "ONEDNN_MAX_CPU_ISA" not in isa,
        "isa_env": isa,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def hardware_line(machine: dict, dtype: str | None = None) -> str:
    """One line naming the hardware of `describe_machine`, and the dtype if given:
    "AMD EPYC, AVX512 kernels, native bfloat16, 2 threads; float32"."""
    parts = [machine["cpu"], f"{machine['capability']} kernels"]
    if machine.get("isa_env"):
        parts[-1] += " (" + " ".join(f"{k}={v}" for k, v in machine["isa_env"].items()) + ")"
    if machine.get("native_bf16") is not None:
        parts.append("native bfloat16" if machine["native_bf16"] else "no native bfloat16")
    parts.append(f"{machine['torch_threads']} threads")
    if machine["device"] != "cpu":
        parts.insert(0, machine["device"])
    return ", ".join(parts) + (f"; {dtype}" if dtype else "")


class DtypeChoice(NamedTuple):
    dtype: torch.dtype
    reason: str  # one line, for the user
    costs: dict  # dtype name -> {"1": ms, "16": ms} where probed

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def per_token_ms(costs: dict[str, float], speculate: bool) -> float:
    """What a token costs with these pass costs: a plain step's, or with speculation the
    cheaper of a plain step and a tree step at PROBE_TREE_TOKENS tokens (the adaptive policy
    takes whichever pays)."""
    plain = costs["1"]
    return min(plain, costs[str(PROBE_NODES)] / PROBE_TREE_TOKENS) if speculate else plain


def timing_identity(machine: dict, **what) -> dict:
    """What a kept timing depends on: the machine as describe_machine gives it (CPU, kernel
    capability, native bfloat16, ISA variables, threads, torch), the host, the probe's shape
    and `what` was timed."""
    identity = {key: machine[key] for key in ("cpu", "capability", "native_bf16", "isa_env", "torch_threads", "torch")}
    return identity | {"host": platform.node(), "nodes": PROBE_NODES, "context": PROBE_CONTEXT} | what


def kept_costs(file: Path, keys: tuple[str, ...]) -> dict[str, dict[str, float]] | None:
    """The pass costs kept in `file` under each of `keys` ({"1": ms, str(PROBE_NODES): ms}),
    or None where there is no such file or it does not read back."""
    if not file.is_file():
        return None
    try:
        costs = json.loads(file.read_text())["costs"]
        return {key: {str(q): float(costs[key][str(q)]) for q in (1, PROBE_NODES)} for key in keys}
    except (ValueError, KeyError, TypeError) as error:
        warnings.warn(f"{file}: not a timing this version reads ({error}); timing again")
        return None


def choose_routing(pass_costs: Callable[[bool], dict[str, float]], model_name: str, dtype: torch.dtype,
                   keep_in: Path, again: bool = False) -> tuple[frozenset[str], str]:
    """Which classes of passes (kernels.rows_class: "few" as the one-token pass, "many" as
    the PROBE_NODES-token one) run faster on PyTorch's own kernels than routed to oneDNN's
    packed linears on this CPU: `pass_costs(routed)` times both ways, and a class leaves the
    routing where that beats it by ROUTING_MARGIN. Kept in `keep_in`, one file per machine,
    threads, torch, model and dtype (`again` times anew). Returns those classes and one line
    saying why."""
    machine = describe_machine("cpu")
    identity = timing_identity(machine, model=model_name, dtype=str(dtype))
    file = keyed_file(keep_in, identity)
    costs = None if again else kept_costs(file, ("routed", "own"))
    timed = costs is None
    if timed:
        costs = {"routed": pass_costs(True), "own": pass_costs(False)}
        atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps({"machine": identity, "costs": costs})))
    own = frozenset(name for name, q in (("few", "1"), ("many", str(PROBE_NODES)))
                    if costs["own"][q] < (1 - ROUTING_MARGIN) * costs["routed"][q])
    reason = (f"{hardware_line(machine, str(dtype).removeprefix('torch.'))}: a pass over 1 / {PROBE_NODES} tokens took "
              f"{costs['routed']['1']:.0f} / {costs['routed'][str(PROBE_NODES)]:.0f} ms routed to oneDNN, "
              f"{costs['own']['1']:.0f} / {costs['own'][str(PROBE_NODES)]:.0f} ms on PyTorch's kernels "
              f"({'timed now' if timed else f'timed earlier, kept in {file}'})")
    return own, reason


def choose_dtype(pass_costs: Callable[[torch.dtype], dict[str, float]], model_name: str, device: torch.device,
                 keep_in: Path, kernels: str = "auto", speculate: bool = True, again: bool = False) -> DtypeChoice:
    """The fastest dtype for this model here. On a CUDA GPU, bfloat16 where it has it. On the
    CPU, float32 and bfloat16 are timed (`pass_costs(dtype)`: milliseconds of a one-token and
    a PROBE_NODES-token pass after PROBE_CONTEXT tokens, keyed "1" and "16") and the one with
    the cheaper token (per_token_ms) wins, float32 unless bfloat16 beats it by EXACT_MARGIN.
    The timings are kept in `keep_in`, one file per machine, threads, torch, kernels and
    model (`again` times them anew)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, f"{torch.cuda.get_device_name(device)} computes in bfloat16", {})
        return DtypeChoice(torch.float32, f"{torch.cuda.get_device_name(device)} has no bfloat16", {})
    if device.type != "cpu":
        raise MLPSpecError(f"dtype auto knows CPUs and CUDA GPUs, not {device}: give --dtype float32 or bfloat16")
    machine = describe_machine(device)
    # "routing": kernels auto's passes as choose_routing left them (timings kept before it differ)
    identity = timing_identity(machine, model=model_name, kernels=kernels, routing="timed")
    file = keyed_file(keep_in, identity)
    costs = None if again else kept_costs(file, ("float32", "bfloat16"))
    timed = costs is None
    if timed:
        costs = {str(dtype).removeprefix("torch."): pass_costs(dtype) for dtype in (torch.float32, torch.bfloat16)}
        atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps({"machine": identity, "costs": costs})))
    f32, bf16 = (per_token_ms(costs[d], speculate) for d in ("float32", "bfloat16"))
    dtype = torch.bfloat16 if bf16 < (1 - EXACT_MARGIN) * f32 else torch.float32
    how = "timed now" if timed else f"timed earlier, kept in {file}"
    estimate = f"{PROBE_TREE_TOKENS} tokens a tree step" if speculate else "plain decoding"
    reason = (
        f"{hardware_line(machine)}: a pass over 1 / {PROBE_NODES} tokens took "
        f"{costs['float32']['1']:.0f} / {costs['float32'][str(PROBE_NODES)]:.0f} ms in float32, "
        f"{costs['bfloat16']['1']:.0f} / {costs['bfloat16'][str(PROBE_NODES)]:.0f} ms in bfloat16 ({how}); "
        f"a token about {f32:.0f} ms against {bf16:.0f} ms ({estimate})"
    )
    return DtypeChoice(dtype, reason, costs)
