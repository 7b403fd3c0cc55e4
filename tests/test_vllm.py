"""mlpspec's drafter inside vLLM's V1 engine (the `vllm` group: skipped where vLLM is not
installed; scripts/setup_vllm.sh builds .venv-vllm, where they run)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from mlpspec import MLPSpeculator, MLPSpeculatorConfig
from mlpspec.export import export_speculator

pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/setup_vllm.sh sets up .venv-vllm)")
pytestmark = pytest.mark.vllm

# greedy, float32, eager: token ids in, token ids out, one JSON line
GENERATE = """
import json, sys
from vllm import LLM, SamplingParams
def main():
    base, spec, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = {"speculative_config": {"method": "eagle", "model": spec, "num_speculative_tokens": k}} if spec else {}
    llm = LLM(model=base, dtype="float32", enforce_eager=True, max_model_len=256, **extra)
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(sys.argv[4])]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
if __name__ == "__main__":
    main()
"""


def generate(base, spec, k, prompts) -> list[list[int]]:
    run = subprocess.run([sys.executable, "-c", GENERATE, str(base), str(spec or ""), str(k), json.dumps(prompts)],
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("TOKENS "))


def test_greedy_output_with_the_speculator_equals_vllm_without_it(tmp_path):
    base = tmp_path / "base"
    model = tiny_llama(hidden=256)  # 4 heads of 64: a head size vLLM's CPU attention takes
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    torch.manual_seed(0)
    speculator = MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=256, n_predict=3)).eval()
    spec = export_speculator(speculator, tmp_path / "spec", "vllm", base_model_name_or_path=str(base),
                             base_config=model.config.to_dict())
    prompts = [[1, 5, 9, 13], [1, 40, 41], [1, 7, 7, 7, 7, 7]]
    plain = generate(base, None, 0, prompts)
    assert [len(row) for row in plain] == [24] * 3
    assert generate(base, spec, 3, prompts) == plain
    assert generate(base, spec, 2, prompts) == plain  # fewer drafts than the speculator's heads
