import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from mlpspec.bench import chat_prompts, code_prompts, compare
from test_decode import random_speculator


def test_code_prompts_come_from_third_party_packages_and_end_at_a_def():
    prompts = code_prompts(6)
    assert len(prompts) == 6 and len(set(prompts)) == 6
    assert all(p.rstrip().split("\n")[-1].lstrip().startswith("def ") for p in prompts)


def test_chat_prompts_are_messages():
    prompts = chat_prompts()
    assert len(prompts) >= 10 and all(p[0]["role"] == "user" for p in prompts)


def test_compare_counts_every_token_and_checks_equality():
    model, tok = tiny_llama(), tiny_tokenizer()
    prompts = ["w1 w2 w3", "w4 w5", "w9 w9 w9 w9"]
    for adaptive, lookup in ((False, 0), (True, 0), (True, 4)):
        result = compare(model, tok, random_speculator(model), prompts, chat=False, max_new_tokens=10,
                         adaptive=adaptive, lookup=lookup)
        assert result.tokens == 30  # no EOS in a random tiny model's greedy text here, or it would stop early
        assert result.steps >= 3 and result.speculative_seconds > 0 and result.plain_seconds > 0
        assert result.tokens_per_step == result.tokens / result.steps


def test_run_bench_writes_results_report_and_plots(tmp_path):
    import json

    from mlpspec.bench import BenchSettings, run_bench, write_report

    model, tok = tiny_llama(), tiny_tokenizer()
    settings = BenchSettings(batch_sizes=[1, 2], max_new_tokens=6, prompt_lengths=[4, 8],
                             prompts=["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"])
    other = tiny_llama().to(torch.bfloat16)  # the same model in the other dtype: its plain methods at batch 1
    report = run_bench(model, tok, random_speculator(model), settings, other=other)
    results = report["results"]
    assert set(results) == {"hf_greedy", "hf_prompt_lookup", "ours_plain", "ours_lookup", "ours_fixed", "ours_adaptive",
                            "hf_greedy_bfloat16", "ours_plain_bfloat16"}
    assert set(results["hf_greedy_bfloat16"]) == set(results["ours_plain_bfloat16"]) == {"1"}
    every = len(results["ours_fixed"]["1"]["batch_tokens_per_s"])  # the floor's methods go on alone
    assert len(results["ours_plain_bfloat16"]["1"]["batch_tokens_per_s"]) == (every + 1) // 2  # every other batch
    assert set(report["fastest_plain"]) == {"1", "2"}  # at batch 2 the float32 methods alone
    machine = report["machine"]
    assert machine["capability"] == torch.backends.cpu.get_cpu_capability() and machine["torch_threads"] >= 1
    assert machine["cpu"] and report["settings"]["dtype"] == "float32" and report["settings"]["kernels"] == "aten"
    assert set(results["ours_fixed"]) == {"1", "2"} and set(results["hf_prompt_lookup"]) == {"1"}
    assert set(results["ours_lookup"]) == {"1"}
    assert results["hf_greedy"]["1"]["speedup"] == 1.0
    assert len(results["ours_fixed"]["2"]["batch_tokens_per_s"]) == settings.min_batches
    # what the floor compares goes on alone to floor_batches; the rest is measured against
    # HF greedy on the batches it ran too: 12 new tokens a batch, so HF's seconds there are 12 / tokens/s
    for method in ("hf_greedy", "ours_plain", "ours_adaptive"):
        assert len(results[method]["2"]["batch_tokens_per_s"]) == settings.floor_batches
    hf_seconds = sum(12 / x for x in results["hf_greedy"]["2"]["batch_tokens_per_s"][: settings.min_batches])
    fixed = results["ours_fixed"]["2"]
    assert fixed["tokens"] == 12 * settings.min_batches
    assert fixed["speedup"] == pytest.approx(fixed["tokens_per_s"] / (12 * settings.min_batches / hf_seconds), rel=2e-3)
    assert set(report["floor"]) == {"1", "2"}
    assert results["ours_plain"]["2"]["tokens_per_step"] == 1.0
    # steps per tree shape: our plain loop takes none, the fixed tree always the configured one
    assert list(results["ours_plain"]["2"]["shapes"]) == ["plain"] and results["hf_greedy"]["2"]["shapes"] == {}
    assert list(results["ours_fixed"]["1"]["shapes"]) == ["[4, 3, 2]x5"]
    assert list(results["ours_lookup"]["1"]["shapes"]) == ["lookup10"]
    assert sum(results["ours_adaptive"]["2"]["shapes"].values()) >= settings.max_new_tokens * settings.min_batches / 6
    assert report["mismatches"] == 0 and report["near_ties"] == 0  # float32: every greedy method agrees
    assert set(report["prompt_length"]) == {"4", "8"}
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["results"]["ours_fixed"]["1"]["tokens"] > 0
    header = (tmp_path / "report.md").read_text().splitlines()[2]
    assert header.startswith(report["date"]) and f"{machine['capability']} kernels" in header
    assert "threads; float32 (kernels aten)" in header and "Command:" not in header
    write_report({**report, "command": "mlpspec bench --batch-sizes 1,2"}, tmp_path)
    assert (tmp_path / "report.md").read_text().splitlines()[2].endswith("Command: `mlpspec bench --batch-sizes 1,2`.")
    assert "Fastest plain decoding measured" in (tmp_path / "report.md").read_text()
    assert "| ours_adaptive | 2 |" in (tmp_path / "report.md").read_text()
    assert "- batch 2: " in (tmp_path / "report.md").read_text()
    without = run_bench(model, tok, random_speculator(model), BenchSettings(batch_sizes=[1], max_new_tokens=4, lookup=0,
                                                                             prompts=settings.prompts))
    assert "ours_lookup" not in without["results"] and "lookup" not in without["adaptive_policy"]
    for plot in ("batch_size.png", "prompt_length.png", "accepted_length.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_the_fixed_tree_and_batch_one_methods_stop_where_they_are_told():
    from mlpspec.bench import HF_METHODS, OUR_METHODS, _methods_at

    everything = [*HF_METHODS, *OUR_METHODS, "ours_plain_float32"]
    assert _methods_at(everything, 1, 4) == everything
    assert _methods_at(everything, 4, 4) == ["hf_greedy", "ours_plain", "ours_fixed", "ours_adaptive"]
    assert _methods_at(everything, 8, 4) == ["hf_greedy", "ours_plain", "ours_adaptive"]


def test_fastest_plain_is_the_best_plain_method_in_either_dtype():
    from mlpspec.bench import fastest_plain

    results = {"hf_greedy": {"1": {"tokens_per_s": 15.0}, "4": {"tokens_per_s": 50.0}},
               "ours_plain": {"1": {"tokens_per_s": 16.0}, "4": {"tokens_per_s": 52.0}},
               "hf_greedy_bfloat16": {"1": {"tokens_per_s": 28.0}},
               "ours_plain_bfloat16": {"1": {"tokens_per_s": 30.0}},
               "ours_fixed": {"1": {"tokens_per_s": 40.0}},
               "ours_adaptive": {"1": {"tokens_per_s": 45.0}, "4": {"tokens_per_s": 65.0}}}
    assert fastest_plain(results) == {
        "1": {"method": "ours_plain_bfloat16", "tokens_per_s": 30.0, "ours_adaptive": 1.5},
        "4": {"method": "ours_plain", "tokens_per_s": 52.0, "ours_adaptive": 1.25},
    }


def test_the_floor_divides_adaptive_by_the_best_plain_method():
    from mlpspec.bench import adaptive_floor

    results = {"hf_greedy": {"1": {"speedup": 1.0}, "16": {"speedup": 1.0}},
               "ours_plain": {"1": {"speedup": 0.98}, "16": {"speedup": 1.04}},
               "ours_adaptive": {"1": {"speedup": 1.80}, "16": {"speedup": 1.01}}}
    assert adaptive_floor(results) == {"1": 1.8, "16": pytest.approx(1.01 / 1.04, abs=1e-3)}
    assert adaptive_floor({"hf_greedy": results["hf_greedy"]}) == {}


def test_batches_come_in_rounds_of_every_batch_size():
    from mlpspec.bench import BenchSettings, _schedule, _take_turns

    settings = BenchSettings(batch_sizes=[1, 4], min_batches=2, floor_batches=3)
    # batch 1: every one of 6 prompts once; batch 4: min_batches, then one more for the floor's methods
    assert _schedule(settings, 6) == [(1, 0, False), (4, 0, False), (1, 1, False), (4, 1, False), (1, 2, False),
                                      (4, 2, True), (1, 3, False), (1, 4, False), (1, 5, False)]
    assert _take_turns(["c0", "c1", "c2"], ["h0"]) == ["c0", "h0", "c1", "c2"]


def test_a_spent_budget_leaves_two_batches_per_batch_size(tmp_path):
    from mlpspec.bench import REQUIRED_BATCHES, BenchSettings, run_bench, write_report

    model, tok = tiny_llama(), tiny_tokenizer()
    settings = BenchSettings(batch_sizes=[1, 2], max_new_tokens=4, methods=["hf_greedy", "ours_plain", "ours_adaptive"],
                             prompts=["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"], minutes=1e-6)
    report = run_bench(model, tok, random_speculator(model), settings)
    for b in ("1", "2"):
        assert len(report["results"]["ours_plain"][b]["batch_tokens_per_s"]) == REQUIRED_BATCHES
        assert report["batches"][b] == {"run": REQUIRED_BATCHES, "left_out": settings.floor_batches - REQUIRED_BATCHES}
    write_report(report, tmp_path)
    assert "batch 2 2 of 8" in (tmp_path / "report.md").read_text()
    unlimited = run_bench(model, tok, random_speculator(model), BenchSettings(**{**settings.__dict__, "minutes": None}))
    assert unlimited["batches"]["2"] == {"run": settings.floor_batches, "left_out": 0}
