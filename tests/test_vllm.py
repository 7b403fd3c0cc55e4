"""mlpspec's drafter inside vLLM's V1 engine (the `vllm` group: skipped where vLLM is not
installed; scripts/test_vllm.sh sets up .venv-vllm and runs them there).

Each run starts vLLM in a subprocess with the engine in that process, so the run can
record, for every request and step, the drafts the step verified and the drafts vLLM's
proposer returned (a wrapper around the model runner's proposal call; vLLM's source is
not touched). The tests rebuild from those the context each proposal was made for and
hold the drafts to the speculator's own top-1 chain on Hugging Face's hidden states.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from mlpspec import MLPSpeculator, MLPSpeculatorConfig
from mlpspec.checkpoint import load_speculator
from mlpspec.cli import main
from mlpspec.generate import speculative_generate
from reference_impl import ReferenceSpeculator

pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/test_vllm.sh sets up .venv-vllm)")
pytestmark = pytest.mark.vllm

# One vLLM run, float32, eager, greedy or sampled (a seed per request): a job file in, a result file out.
RUN = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its drafts can be read
from vllm import LLM, SamplingParams
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

def main():
    job = json.load(open(sys.argv[1]))
    steps = {}  # prompt -> [[drafts this step verified, drafts proposed for the next], ...]
    propose = GPUModelRunner.propose_draft_token_ids
    def recording(runner, scheduler_output, *args, **kwargs):
        drafts = propose(runner, scheduler_output, *args, **kwargs)
        rows = drafts.tolist() if isinstance(drafts, __import__("torch").Tensor) else drafts
        for i, req_id in enumerate(runner.input_batch.req_ids):
            verified = scheduler_output.scheduled_spec_decode_tokens.get(req_id, [])
            prompt = json.dumps(runner.requests[req_id].prompt_token_ids)
            steps.setdefault(prompt, []).append([list(verified), list(rows[i])])
        return drafts
    if job["record"]:
        GPUModelRunner.propose_draft_token_ids = recording
    extra = {}
    if job["spec"]:
        extra["speculative_config"] = {"method": "eagle", "model": job["spec"],
                                       "num_speculative_tokens": job["k"], **job["spec_extra"]}
    llm = LLM(model=job["base"], dtype="float32", enforce_eager=True, max_model_len=256,
              disable_log_stats=False, **extra)
    t = job["temperature"]
    params = [SamplingParams(temperature=t, max_tokens=n, ignore_eos=True, seed=i if t else None)
              for i, n in enumerate(job["max_tokens"])]
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params)
    metrics = {m.name: getattr(m, "value", getattr(m, "values", None)) for m in llm.get_metrics()
               if m.name.startswith("vllm:spec_decode_num")}
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
               "steps": [steps.get(json.dumps(p), []) for p in job["prompts"]],
               "metrics": metrics}, open(sys.argv[2], "w"))
if __name__ == "__main__":
    main()
"""


def start_vllm(tmp_path, base, spec, prompts, max_tokens, k=0, temperature=0.0, record=True,
               **spec_extra) -> tuple[subprocess.CompletedProcess, Path]:
    """Start one run; `record`: the drafts of every step, by prompt (distinct prompts only)."""
    job, result = tmp_path / f"job-{k}.json", tmp_path / f"result-{k}.json"
    job.write_text(json.dumps({"base": str(base), "spec": str(spec or ""), "k": k, "spec_extra": spec_extra,
                               "prompts": prompts, "max_tokens": max_tokens, "temperature": temperature,
                               "record": record}))
    run = subprocess.run([sys.executable, "-c", RUN, str(job), str(result)], capture_output=True, text=True,
                         timeout=900)
    return run, result


def run_vllm(tmp_path, base, spec, prompts, max_tokens, k=0, temperature=0.0, record=True, **spec_extra) -> dict:
    run, result = start_vllm(tmp_path, base, spec, prompts, max_tokens, k, temperature, record, **spec_extra)
    assert run.returncode == 0 and result.is_file(), run.stderr[-3000:]
    return json.loads(result.read_text())


def proposals(prompt: list[int], output: list[int], steps: list) -> list[tuple[list[int], list[int]]]:
    """(context, drafts) for every proposal made within the returned tokens. The prefill
    samples output[0] and proposes for prompt + output[:1]; each later step verifies the
    drafts it was given, keeps the ones the output agrees with plus the target's own token,
    and proposes for what the context has then become."""
    made, known = [], 1
    for i, (verified, drafts) in enumerate(steps):
        if i:
            kept = 0
            while kept < len(verified) and known + kept < len(output) and verified[kept] == output[known + kept]:
                kept += 1
            known += kept + 1
        if known >= len(output):
            break
        made.append((prompt + output[:known], drafts))
    return made


def test_proposals_by_hand():
    steps = [[[], [5, 6, 7]],          # prefill: output[0] = 4
             [[5, 6, 7], [9, 1, 1]],   # 5, 6 kept, 8 is the target's own (drafted 7)
             [[9], [2, 3, 3]],         # dynamic K: one draft verified, 9 kept, 1 the target's
             [[2, 3, 3], [0, 0, 0]]]   # past the returned tokens: not a proposal we can check
    output = [4, 5, 6, 8, 9, 1, 2]
    assert proposals([10, 11], output, steps) == [
        ([10, 11, 4], [5, 6, 7]),
        ([10, 11, 4, 5, 6, 8], [9, 1, 1]),
        ([10, 11, 4, 5, 6, 8, 9, 1], [2, 3, 3]),
    ]


def checked_proposals(model, result, prompts, chain) -> int:
    """Hold every proposal vLLM made to `chain(state, token)` on HF's final states: the
    state before the context's last token, and that token. Returns how many were checked."""
    checked = 0
    for prompt, output, steps in zip(prompts, result["tokens"], result["steps"]):
        with torch.no_grad():
            states = model(torch.tensor([prompt + output]), output_hidden_states=True).hidden_states[-1][0]  # n d
        for context, drafts in proposals(prompt, output, steps):
            expected = chain(states[len(context) - 2], context[-1])
            assert drafts == expected[: len(drafts)], (context, drafts, expected)
            checked += 1
    return checked


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    model = tiny_llama(hidden=256).eval()  # 4 heads of 64: a head size vLLM's CPU attention takes
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    folder, _ = base
    return run_vllm(tmp_path_factory.mktemp("plain"), folder, None, PROMPTS, [40] * len(PROMPTS))


PROMPTS = [[5, 9, 13], [40, 41, 8], [7, 7, 7, 7, 7], [20, 23, 26, 29]]  # "w1 w5 w9", ...


def test_released_format_drafts_are_the_authors_math_at_any_number_of_drafts(base, plain, tmp_path):
    """An accelerator in the released (IBM) format, untied, inner_dim != emb_dim, through
    mlpspec export --format vllm: every draft vLLM proposes is the authors' top-1 chain
    (tests/reference_impl.py) and mlpspec's, while the number of drafts changes with the
    batch size (dynamic speculative decoding: 4 requests 2 drafts, 3 one, 2 three, 1 none)
    and the greedy output stays vLLM's own."""
    folder, model = base
    config = {"model_type": "mlp_speculator", "architectures": ["MLPSpeculatorPreTrainedModel"], "vocab_size": 64,
              "emb_dim": 256, "inner_dim": 96, "n_predict": 3, "top_k_tokens_per_head": [4, 3, 2],
              "n_candidates": 5, "tie_weights": False, "scale_input": False}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(3):
        tensors[f"speculator.emb.{i}.weight"] = torch.randn(64, 96, generator=generator)
        tensors[f"speculator.proj.{i}.weight"] = torch.randn(96, 256 if i == 0 else 96, generator=generator) / 16
        tensors[f"speculator.head.{i}.weight"] = torch.randn(64, 96, generator=generator)
        tensors[f"speculator.ln.{i}.weight"] = 1 + torch.randn(96, generator=generator) / 10
        tensors[f"speculator.ln.{i}.bias"] = torch.randn(96, generator=generator) / 10
    authors = ReferenceSpeculator(config, tensors)
    authors.save(tmp_path / "released")
    assert main(["export", "--speculator", str(tmp_path / "released"), "--format", "vllm", "--base", str(folder),
                 "--out", str(tmp_path / "spec")]) == 0

    max_tokens = [16, 24, 32, 40]  # requests finish one by one: the batch shrinks 4, 3, 2, 1
    schedule = [[1, 1, 0], [2, 2, 3], [3, 3, 1], [4, 4, 2]]
    result = run_vllm(tmp_path, folder, tmp_path / "spec", PROMPTS, max_tokens, k=3,
                      num_speculative_tokens_per_batch_size=schedule)
    assert result["tokens"] == [row[:n] for row, n in zip(plain["tokens"], max_tokens)]
    widths = {len(drafts) for steps in result["steps"] for _, drafts in steps}
    assert {1, 2, 3} <= widths  # the number of drafts did change within the run
    ours = load_speculator(tmp_path / "released")
    checked = checked_proposals(model, result, PROMPTS, lambda s, t: authors.chain(s, t))
    assert checked >= 20
    print(f"{checked} proposals checked, drafts per step {sorted(widths)}")
    assert checked == checked_proposals(model, result, PROMPTS, lambda s, t: ours.propose(
        s[None, None], torch.tensor([[t]]), [1, 1, 1], 1)[0][0, 0].tolist())


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A speculator trained on the base model's own greedy answers to PROMPTS (so that it
    accepts often: the tests compare measurements, not the speculator), sharing the base
    model's embeddings (tie_base_embeddings, written out by the export) and scoring a
    draft vocabulary of 40 tokens. Returns (mlpspec's run folder, the vllm folder)."""
    folder, _ = base
    tmp_path = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLPSPEC_CACHE", str(tmp_path / "cache"))
        words = tiny_tokenizer().convert_ids_to_tokens
        (tmp_path / "asks.jsonl").write_text("".join(json.dumps({"prompt": " ".join(words(p))}) + "\n" for p in PROMPTS))
        # every word equally often: the draft vocabulary is decided by the answers
        (tmp_path / "text.txt").write_text("\n".join(" ".join(f"w{(i + j) % 60}" for j in range(60)) for i in range(8)))
        assert main(["train", "--no-progress", "--base", str(folder), "--data", str(tmp_path / "text.txt"),
                     "--out", str(tmp_path / "run"), "--tie-base-embeddings", "--draft-vocab-size", "40",
                     "--n-predict", "3", "--seq-len", "24", "--batch-size", "8", "--stage1-steps", "0",
                     "--stage2-steps", "300", "--save-every", "300", "--stage2-prompts", str(tmp_path / "asks.jsonl"),
                     "--stage2-greedy", "--stage2-rows", "4", "--generate-batch-size", "4", "--stage2-new-tokens", "44",
                     "--lr", "3e-3", "--warmup-steps", "10", "--eval-rows", "4", "--eval-new-tokens", "12"]) == 0
        assert main(["export", "--speculator", str(tmp_path / "run"), "--format", "vllm", "--base", str(folder),
                     "--out", str(tmp_path / "spec")]) == 0
    return tmp_path / "run", tmp_path / "spec"


def test_trained_speculator_acceptance_matches_mlpspecs_own(base, plain, trained, tmp_path):
    """vLLM's spec-decode metrics report the acceptance mlpspec's own chain decoding
    reaches with the same speculator on the same prompts."""
    folder, model = base
    run, spec = trained
    result = run_vllm(tmp_path, folder, spec, PROMPTS, [40] * len(PROMPTS), k=3)
    assert result["tokens"] == plain["tokens"]
    metrics = result["metrics"]
    vllm_rate = metrics["vllm:spec_decode_num_accepted_tokens"] / metrics["vllm:spec_decode_num_draft_tokens"]

    speculator = load_speculator(run, base=model)
    accepted = drafted = 0
    for prompt in PROMPTS:
        out = speculative_generate(model, speculator, torch.tensor([prompt]), max_new_tokens=40,
                                   top_k_tokens_per_head=[1, 1, 1], n_candidates=1)
        assert out.sequences[0, len(prompt):].tolist() == plain["tokens"][PROMPTS.index(prompt)]
        steps = torch.cat(out.stats.accepted)  # one row: accepted drafts per speculative step
        accepted, drafted = accepted + int(steps.clamp(min=0).sum()), drafted + 3 * int((steps >= 0).sum())
    ours_rate = accepted / drafted
    print(f"acceptance: vLLM {vllm_rate:.3f}, mlpspec {ours_rate:.3f} ({accepted}/{drafted}), metrics {metrics}")
    assert ours_rate > 0.25  # a trained speculator: the comparison means something
    assert abs(vllm_rate - ours_rate) <= 0.05


@pytest.mark.xfail(strict=True, reason=(
    "vLLM 0.32.0's CPU build: a sampled token that follows a draft leans to the draft (total variation 0.24 "
    "against 0.02 for vLLM without the speculator); the drafts are the chain and vLLM's CPU rejection kernels "
    "are right on their own (docs/vllm-plugin.md, Open)"))
def test_sampled_tokens_keep_the_base_models_distribution(base, trained, tmp_path):
    """Sampling (temperature 0.1) through vLLM's rejection sampler with the drafter's
    deterministic drafts: over 4000 seeded requests of 3 tokens, the second and third
    tokens, which pass through verification, are distributed as the base model's exact
    marginals say (Hugging Face, float32): their total variation from them stays within
    1.5 times what 4000 exact draws give on average (50 simulated runs of 4000 stayed
    within 1.2 times); and drafts were accepted."""
    folder, model = base
    _, spec = trained
    prompt, n, t = PROMPTS[2], 4000, 0.1  # the prompt whose chain accepts most when sampled
    result = run_vllm(tmp_path, folder, spec, [prompt] * n, [3] * n, k=3, temperature=t, record=False)
    metrics = result["metrics"]
    print(f"sampled: {metrics}")
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 100  # the accepting path ran, often
    with torch.no_grad():  # the exact distributions of tokens 1, 2 and 3
        V = model.config.vocab_size
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / t, -1)  # V
        firsts = torch.tensor([prompt + [a] for a in range(V)])  # V P+1
        p2 = p1[:, None] * torch.softmax(model(firsts).logits[:, -1] / t, -1)  # V V   joint of tokens 1, 2
        p3 = torch.zeros(V)
        for a in range(V):
            pairs = torch.cat([firsts[a].expand(V, -1), torch.arange(V)[:, None]], 1)  # V P+2
            p3 += (p2[a, :, None] * torch.softmax(model(pairs).logits[:, -1] / t, -1)).sum(0)
    tokens = torch.tensor(result["tokens"])  # n 3
    for i, exact in ((1, p2.sum(0)), (2, p3)):
        seen = torch.bincount(tokens[:, i], minlength=V) / n
        tv = 0.5 * float((seen - exact).abs().sum())
        noise = 0.5 * float((exact * (1 - exact) / n).sqrt().sum()) * (2 / math.pi) ** 0.5  # E[TV] of n draws
        print(f"token {i + 1}: total variation {tv:.4f}, sampling alone {noise:.4f}")
        assert tv < 1.5 * noise


def test_mlpspec_serve_with_vllm(base, plain, tmp_path):
    """mlpspec serve --engine vllm: a speculator folder in mlpspec's own format, exported
    on the way, behind vLLM's OpenAI server; a greedy completion is vLLM's plain output."""
    folder, _ = base
    torch.manual_seed(0)
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=256, n_predict=3)).save_pretrained(tmp_path / "spec")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLPSPEC_CACHE": str(tmp_path / "cache")}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlpspec"), "serve", "--engine", "vllm", "--base",
                               str(folder), "--speculator", str(tmp_path / "spec"), "--port", str(port),
                               "--dtype", "float32", "--model-id", "tiny", "--", "--enforce-eager",
                               "--max-model-len", "256"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()[-8000:]
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        reply = httpx.post(f"{url}/completions", timeout=120, json={
            "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}).json()
        assert reply["choices"][0]["token_ids"] == plain["tokens"][0][:16], reply
        assert list((tmp_path / "cache" / "vllm-exports").iterdir())  # the export it served
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_speculator_for_another_base_is_refused_in_one_line(base, tmp_path):
    folder, _ = base
    other = tmp_path / "other"
    tiny_llama(hidden=128).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=128, n_predict=3)).save_pretrained(tmp_path / "spec")
    assert main(["export", "--speculator", str(tmp_path / "spec"), "--format", "vllm", "--base", str(other),
                 "--out", str(tmp_path / "spec-vllm")]) == 0
    run, result = start_vllm(tmp_path, folder, tmp_path / "spec-vllm", PROMPTS[:1], [4], k=3)
    assert run.returncode != 0 and not result.exists()
    assert "speculator emb_dim 128 does not match the base model's hidden size 256" in run.stderr
