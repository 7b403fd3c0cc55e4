import pytest
import torch

from mlpspec import MLPSpeculator, speculator_config_for
from mlpspec.cli import main
from conftest import tiny_llama


def test_info_prints_both_configs(tiny_llama_folder, tmp_path, capsys):
    spec = MLPSpeculator(speculator_config_for(tiny_llama(), n_predict=2, inner_dim=16))
    spec.save_pretrained(tmp_path / "spec")
    assert main(["info", "--base", str(tiny_llama_folder), "--speculator", str(tmp_path / "spec")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM: hidden size 32, 2 layers, vocab 64" in out
    assert "emb_dim 32, inner_dim 16, n_predict 2, top_k_tokens_per_head [4, 3], n_candidates 5" in out
    n = spec.num_parameters()
    assert f"{n / 1e6:.1f}M parameters" in out


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
