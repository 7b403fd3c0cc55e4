import json

import pytest

from mlpspec import MLPSpecError, load_base
from mlpspec.base import TREE_ATTENTION
from mlpspec.serving_bench import (ServingSettings, Timing, arrivals, budgets, median_run, paired_ratios,
                                   replay, run_serving_bench, summarize, write_serving_report)
from test_decode import random_speculator


def test_arrivals_are_a_seeded_poisson_process():
    times = arrivals(2.0, 4000, seed=1)
    assert times[0] == 0 and times == sorted(times) and times == arrivals(2.0, 4000, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.5) < 0.03  # mean gap 1 / rate


def test_mixed_lengths_are_seeded_draws_around_max_tokens():
    mixed = budgets(48, 4000, "mixed", seed=3)
    assert mixed == budgets(48, 4000, "mixed", seed=3) and mixed != budgets(48, 4000, "mixed", seed=4)
    assert min(mixed) == 16 and max(mixed) == 80  # uniform in [48 // 3, 5 * 48 // 3]
    assert abs(sum(mixed) / len(mixed) - 48) < 1
    assert budgets(48, 3, "fixed", seed=3) == [48, 48, 48]
    assert min(budgets(1, 50, "mixed", seed=0)) == 1  # never below one token


def test_replay_sends_each_request_its_own_max_tokens():
    seen = []
    replay(lambda timing, prompt, max_tokens: seen.append((prompt, max_tokens)), [[1], [2], [3]], [0.0, 0.01, 0.02],
           [5, 9, 2])
    assert sorted(seen) == [([1], 5), ([2], 9), ([3], 2)]


def test_summary_by_hand():
    timings = [Timing(sent=0.0, first=0.5, done=2.5, tokens=5, tokens_per_step=2.0),
               Timing(sent=1.0, first=1.2, done=1.6, tokens=3, tokens_per_step=1.0),
               Timing(sent=2.0, error="HTTP 503")]
    summary = summarize(timings, wall=4.0)
    assert summary["errors"] == 1 and summary["completion_tokens"] == 8 and summary["tokens_per_s"] == 2.0
    assert summary["ttft_p50_s"] == 0.5 and summary["ttft_p95_s"] == 0.5  # of 0.5 and 0.2, upper median
    assert summary["itl_p50_s"] == 0.5 and summary["tokens_per_step"] == 1.5  # (2.5-0.5)/4 and (1.6-1.2)/2


def test_every_target_serves_the_same_schedule(tmp_path, tiny_llama_folder):
    model, tokenizer = load_base(tiny_llama_folder)  # with mlpspec's tree attention, which transformers' CB refuses
    assert model.config._attn_implementation == TREE_ATTENTION
    prompts = [tokenizer(f"w{i} w{i + 1} w{i + 2}").input_ids for i in range(4)]
    settings = ServingSettings(rates=[20.0], requests=4, max_tokens=6, max_batch=4, repeats=2)
    report = run_serving_bench(model, tokenizer, random_speculator(model, seed=9), prompts, settings)
    assert set(report["results"]) == {"mlpspec", "mlpspec_plain", "transformers_cb"}
    for target, by_rate in report["results"].items():
        result = by_rate["20.0"]
        assert result["errors"] == 0, target
        # each request stops at its own max_tokens (mixed lengths) or at EOS first
        assert 4 <= result["completion_tokens"] <= sum(budgets(6, 4, "mixed", 0)), target
        assert result["ttft_p50_s"] is not None, target
        assert len(result["tokens_per_s_runs"]) == 2, target
    assert len(report["speculation_on_off"]["20.0"]["rounds"]) == 2
    assert model.config._attn_implementation == TREE_ATTENTION  # given back after the anchor's run
    write_serving_report({**report, "command": "mlpspec bench --serving --rates 20"}, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "serving.json").read_text())["settings"]["requests"] == 4
    first = (tmp_path / "out" / "serving.md").read_text().splitlines()[0]  # what made the figures
    assert first.startswith(report["date"]) and f"{report['machine']['capability']} kernels" in first
    assert "; float32; `mlpspec bench --serving --rates 20`" in first
    assert "transformers_cb" in (tmp_path / "out" / "serving.md").read_text()
    assert (tmp_path / "out" / "serving.png").stat().st_size > 0


def test_median_run_and_paired_ratios_by_hand():
    on = [{"tokens_per_s": 30.0, "errors": 0}, {"tokens_per_s": 10.0, "errors": 1}, {"tokens_per_s": 20.0, "errors": 0}]
    off = [{"tokens_per_s": 20.0, "errors": 0}, {"tokens_per_s": 20.0, "errors": 0}, {"tokens_per_s": 16.0, "errors": 0}]
    assert median_run(on) == {"tokens_per_s": 20.0, "errors": 1, "tokens_per_s_runs": [30.0, 10.0, 20.0]}
    assert median_run(on[:2])["tokens_per_s"] == 10.0  # of an even count, the lower middle run
    assert paired_ratios(on, off) == {"rounds": [1.5, 0.5, 1.25], "median": 1.25}


def test_bad_settings():
    with pytest.raises(MLPSpecError, match="rates must be positive"):
        ServingSettings(rates=[0])
    with pytest.raises(MLPSpecError, match="unknown targets"):
        ServingSettings(targets=("vllm",))
    with pytest.raises(MLPSpecError, match="repeats"):
        ServingSettings(repeats=0)
    with pytest.raises(MLPSpecError, match="lengths must be one of mixed, fixed"):
        ServingSettings(lengths="random")


def test_settings_give_every_target_the_same_budgets():
    settings = ServingSettings(requests=50, max_tokens=30, seed=7)
    assert settings.budgets() == budgets(30, 50, "mixed", 7) == settings.budgets()
    assert ServingSettings(requests=3, max_tokens=30, lengths="fixed").budgets() == [30, 30, 30]
