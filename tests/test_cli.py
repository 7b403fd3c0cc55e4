import argparse

import pytest
import torch

from mlpspec import MLPSpeculator, speculator_config_for
from mlpspec.cli import build_parser, main
from conftest import tiny_llama, tiny_tokenizer


def test_info_prints_both_configs(tiny_llama_folder, tmp_path, capsys):
    spec = MLPSpeculator(speculator_config_for(tiny_llama(), n_predict=2, inner_dim=16))
    spec.save_pretrained(tmp_path / "spec")
    assert main(["info", "--base", str(tiny_llama_folder), "--speculator", str(tmp_path / "spec")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM: hidden size 32, 2 layers, vocab 64" in out and "float32, on cpu" in out
    assert "emb_dim 32, inner_dim 16, n_predict 2, top_k_tokens_per_head [4, 3], n_candidates 5" in out
    n = spec.num_parameters()
    assert f"{n / 1e6:.1f}M parameters of its own" in out


def test_info_refuses_a_mismatched_pair_in_one_line(tiny_llama_folder, tmp_path, capsys):
    MLPSpeculator(speculator_config_for(tiny_llama(hidden=48))).save_pretrained(tmp_path / "spec")
    assert main(["info", "--base", str(tiny_llama_folder), "--speculator", str(tmp_path / "spec")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mlpspec: error: speculator emb_dim 48 does not match the base model's hidden size 32"


def test_info_bad_speculator_folder(tiny_llama_folder, tmp_path, capsys):
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "config.json").write_text("{oops")
    assert main(["info", "--base", str(tiny_llama_folder), "--speculator", str(tmp_path / "spec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: not valid JSON" in err


def test_info_without_a_shipped_speculator_says_so(tiny_llama_folder, capsys, monkeypatch):
    import mlpspec.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "DEFAULT_SPECULATOR", "no_such_folder")
    assert main(["info", "--base", str(tiny_llama_folder)]) == 0
    assert "freshly initialised, untrained" in capsys.readouterr().out


def test_generate_streams_one_prompt_and_prints_stats(tiny_llama_folder, capsys):
    args = ["generate", "w1 w2 w3", "--base", str(tiny_llama_folder), "--max-new-tokens", "9", "--stats",
            "--dtype", "float32"]
    assert main(args) == 0
    speculative = capsys.readouterr()
    assert "freshly initialised, untrained" in speculative.err
    assert "9 tokens in" in speculative.err and "tokens/step" in speculative.err
    assert "per-head acceptance" in speculative.err
    assert main(args + ["--no-speculate"]) == 0
    plain = capsys.readouterr()
    assert plain.out == speculative.out and plain.out.strip()  # lossless: the same text
    assert "[plain decoding, float32]" in plain.err and "1.00 tokens/step" in plain.err
    assert main(args + ["--lookup", "0", "--no-adaptive"]) == 0  # the speculator's fixed tree alone
    assert capsys.readouterr().out == plain.out
    assert main(args + ["--device", "cpu"]) == 0  # auto is the CPU here
    assert capsys.readouterr().out == plain.out


def test_generate_times_the_steps_once_per_machine(tiny_llama_folder, calibrations_apart, monkeypatch, capsys):
    import mlpspec.decode as decode

    timed = []
    calibrate = decode.calibrate
    monkeypatch.setattr(decode, "calibrate", lambda *args: timed.append(1) or calibrate(*args))
    args = ["generate", "w1 w2 w3", "--base", str(tiny_llama_folder), "--max-new-tokens", "9"]
    assert main(args) == 0 and len(timed) == 1 and len(list(calibrations_apart.glob("*.json"))) == 1
    text = capsys.readouterr().out
    assert main(args) == 0 and len(timed) == 1  # the next call reads what the first measured
    assert capsys.readouterr().out == text
    assert main(args + ["--recalibrate"]) == 0 and len(timed) == 2
    assert main(args + ["--no-adaptive"]) == 0 and len(timed) == 2  # a fixed tree needs no costs


def test_generate_dtype_auto_says_what_it_chose_and_times_once(tiny_llama_folder, calibrations_apart, capsys,
                                                                monkeypatch):
    import mlpspec.base as base
    from mlpspec.kernels import packing_dtype

    timed = []
    pass_costs = base.pass_costs
    monkeypatch.setattr(base, "pass_costs", lambda model: timed.append(model.dtype) or pass_costs(model))
    args = ["generate", "w1 w2 w3", "--base", str(tiny_llama_folder), "--max-new-tokens", "4"]
    assert main(args) == 0
    first = capsys.readouterr().err.splitlines()[0]
    # each dtype's passes: where oneDNN packs it, routed there and not (the kernels' routing), then as chosen
    assert timed == [d for d in (torch.float32, torch.bfloat16) for _ in range(3 if packing_dtype(d) else 1)]
    assert first.startswith(("[dtype auto: float32. ", "[dtype auto: bfloat16. ")) and "threads" in first
    assert "kernels" in first and "ms in float32" in first and "(timed now)" in first
    first_timings = len(timed)
    assert main(args) == 0 and len(timed) == first_timings  # kept per machine and model
    assert "timed earlier, kept in" in capsys.readouterr().err.splitlines()[0]
    assert main(args + ["--device", "meta"]) == 2
    assert capsys.readouterr().err == ("mlpspec: error: dtype auto knows CPUs and CUDA GPUs, not meta: "
                                       "give --dtype float32 or bfloat16\n")


def test_generate_refuses_a_negative_lookup(tiny_llama_folder, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "w1", "--base", str(tiny_llama_folder), "--lookup", "-2"])
    assert "--lookup: must be >= 0, got -2" in capsys.readouterr().err


def test_generate_batch_file(tiny_llama_folder, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "w1 w2"}\n{"prompt": "w3 w4 w5 w6"}\n')
    assert main(["generate", "--batch-file", str(path), "--base", str(tiny_llama_folder),
                 "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 1\n") and "\n--- 2\n" in out


def test_generate_bad_batch_file_names_the_line(tiny_llama_folder, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "w1"}\n{"prompt": "w2"}\n{"promt": "w3"}\n')
    assert main(["generate", "--batch-file", str(path), "--base", str(tiny_llama_folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith('prompts.jsonl:3: expected an object with "prompt" or "messages"')


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give prompts as arguments or with --batch-file"),
        (["w1", "--chat"], "no chat template"),
        (["w1", "--max-new-tokens", "500"], "exceeds the model's context of 256"),
        (["w1", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
        (["w1", "--device", "gpu0"], "device must be 'auto' or a torch device such as cpu or cuda:0, got 'gpu0'"),
    ],
)
def test_generate_bad_input_is_one_line(tiny_llama_folder, capsys, extra, message):
    import re

    assert main(["generate", "--base", str(tiny_llama_folder), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err.strip().splitlines()[-1])


def test_prompts_writes_the_base_models_own_requests(tiny_llama_folder, tmp_path, capsys):
    from test_text import CHAT_TEMPLATE

    from mlpspec.text import read_prompt_file

    args = ["prompts", "--base", str(tiny_llama_folder), "--out", str(tmp_path / "p.jsonl"), "--n", "3"]
    assert main(args) == 2  # the tiny tokenizer has no chat template
    assert "no chat template" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tiny_llama_folder)
    assert main(args) == 0
    prompts = read_prompt_file(tmp_path / "p.jsonl")
    assert len({m[0]["content"] for m in prompts}) == len(prompts) == 3
    assert not (tmp_path / "p.jsonl.parts").exists()  # the batches kept for a resume go once the file is whole
    assert main(args) == 2  # never over a file that exists
    assert "exists" in capsys.readouterr().err
    led = ["prompts", "--base", str(tiny_llama_folder), "--out", str(tmp_path / "led.jsonl"), "--n", "3",
           "--lead", "w7 w8", "--lead", "w9"]
    assert main(led) == 0
    texts = [m[0]["content"] for m in read_prompt_file(tmp_path / "led.jsonl")]
    assert len(texts) == 3 and all(t.startswith(("w7 w8 ", "w9 ")) for t in texts)


def test_every_flag_of_every_command_says_what_it_does():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert all(choice.help for choice in commands._choices_actions)  # `mlpspec --help`: one line a command
    for name, command in commands.choices.items():
        for action in command._actions:
            assert isinstance(action, argparse._HelpAction) or action.help, f"mlpspec {name} {action.option_strings}"
        command.format_help()  # every %(default)s expands
