import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from mlpspec import MLPSpecError, MLPSpeculator, MLPSpeculatorConfig
from mlpspec.checkpoint import load_speculator
from mlpspec.cli import main
from mlpspec.export import export_speculator
from reference_impl import ReferenceSpeculator
from test_checkpoint import RELEASED


def released(name, seed=0):
    """A released config at 1/64 of the width and 1/256 of the vocabulary, weights off their init."""
    d, m, h, top_k, n, V, tied = RELEASED[name]
    cfg = MLPSpeculatorConfig(vocab_size=math.ceil(V / 256), emb_dim=d // 64, inner_dim=m // 64, n_predict=h,
                              top_k_tokens_per_head=top_k, n_candidates=n, tie_weights=tied, scale_input=tied)
    torch.manual_seed(seed)
    model = MLPSpeculator(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def same_outputs(a, b, d, V, h):
    state, ids = torch.randn(2, 5, d), torch.randint(0, V, (2, 5 + h))
    assert torch.equal(a(state, ids), b(state, ids))
    last = torch.randint(0, V, (2, 1))
    assert torch.equal(a.propose(state[:, :1], last)[0], b.propose(state[:, :1], last)[0])


@pytest.mark.parametrize("name", sorted(RELEASED))
@pytest.mark.parametrize("fmt", ["ibm", "arctic"])
def test_released_configs_export_round_trip_bit_exactly(tmp_path, name, fmt):
    model = released(name)
    out = export_speculator(model, tmp_path / fmt, fmt, base_model_name_or_path="org/base",
                            base_architectures=["LlamaForCausalLM"])
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base"
    assert config["inner_dim"] == model.config.inner_dim > 0
    assert len(config["top_k_tokens_per_head"]) == config["n_predict"]
    if fmt == "ibm":
        assert config["architectures"] == ["MLPSpeculatorPreTrainedModel"]
        assert "base_model_archs" not in config
    else:
        assert config["architectures"] == ["ArcticMLPSpeculatorPreTrainedModel"]
        assert config["base_model_archs"] == ["LlamaForCausalLM"]
    loaded = load_speculator(out)
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), k
    cfg = model.config
    same_outputs(model, loaded, cfg.emb_dim, cfg.vocab_size, cfg.n_predict)


def test_ibm_export_reads_in_the_reference_implementation(tmp_path):
    model = released("llama2-70b-accelerator")  # tie_weights + scale_input
    out = export_speculator(model, tmp_path / "ibm", "ibm", base_model_name_or_path="org/base")
    ref = ReferenceSpeculator.load(out)
    state, ids = torch.randn(2, 5, model.config.emb_dim), torch.randint(0, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(ref.forward(state, ids), model(state, ids), atol=1e-5, rtol=1e-5)


def test_base_tied_embeddings_are_materialised(tmp_path):
    base = tiny_llama()
    cfg = MLPSpeculatorConfig(vocab_size=base.config.vocab_size, emb_dim=base.config.hidden_size, n_predict=3,
                              tie_base_embeddings=True, base_model_name_or_path="org/tiny")
    torch.manual_seed(0)
    model = MLPSpeculator(cfg).eval()
    model.attach_base(base)
    out = export_speculator(model, tmp_path / "ibm", "ibm", base_architectures=["LlamaForCausalLM"])
    tensors = load_file(out / "model.safetensors")
    for i in range(3):
        assert torch.equal(tensors[f"speculator.emb.{i}.weight"], base.get_input_embeddings().weight)
        assert torch.equal(tensors[f"speculator.head.{i}.weight"], base.get_output_embeddings().weight)
    config = json.loads((out / "config.json").read_text())
    assert "tie_base_embeddings" not in config and config["inner_dim"] == base.config.hidden_size
    loaded = load_speculator(out)  # no base needed any more
    same_outputs(model, loaded, cfg.emb_dim, cfg.vocab_size, 3)


def test_emb_adapter_is_multiplied_out(tmp_path):
    base = tiny_llama()
    cfg = MLPSpeculatorConfig(vocab_size=base.config.vocab_size, emb_dim=base.config.hidden_size, n_predict=3,
                              tie_base_embeddings=True, emb_adapter=True, base_model_name_or_path="org/tiny")
    torch.manual_seed(0)
    model = MLPSpeculator(cfg).eval()
    model.attach_base(base)
    with torch.no_grad():
        for adapter in model.emb_adapter:
            adapter.weight.add_(torch.randn_like(adapter.weight) / 4)  # off the identity, each stage its own
    out = export_speculator(model, tmp_path / "ibm", "ibm", base_architectures=["LlamaForCausalLM"])
    tensors = load_file(out / "model.safetensors")
    assert not any("adapter" in k for k in tensors)
    E = base.get_input_embeddings().weight
    assert torch.allclose(tensors["speculator.emb.1.weight"], E @ model.emb_adapter[1].weight.T)
    config = json.loads((out / "config.json").read_text())
    assert "emb_adapter" not in config
    loaded = load_speculator(out)
    state, ids = torch.randn(2, 5, cfg.emb_dim), torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.allclose(loaded(state, ids), model(state, ids), atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    ({"draft_vocab_size": 8}, "draft vocabulary of 8 tokens"),
    ({"token_conditioning": False}, "no token conditioning"),
    ({"feature_layers": [3]}, r"also reads the base model's layers \[3\]"),
    ({"base_model_name_or_path": None}, "needs the base model's name"),
])
def test_what_a_format_cannot_express_is_refused(tmp_path, changes, message):
    cfg = dict(vocab_size=16, emb_dim=8, n_predict=2, base_model_name_or_path="org/base")
    model = MLPSpeculator(MLPSpeculatorConfig(**{**cfg, **changes}))
    with pytest.raises(MLPSpecError, match=message):
        export_speculator(model, tmp_path / "out", "ibm")
    assert not (tmp_path / "out").exists()


def test_export_cli(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(base)
    model = MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=2))
    model.save_pretrained(tmp_path / "spec")
    args = ["export", "--speculator", str(tmp_path / "spec"), "--format", "arctic", "--base", str(base)]
    assert main([*args, "--out", str(tmp_path / "arctic")]) == 0
    config = json.loads((tmp_path / "arctic" / "config.json").read_text())
    assert config["base_model_archs"] == ["LlamaForCausalLM"] and config["base_model_name_or_path"] == str(base)
    assert main([*args, "--out", str(tmp_path / "arctic")]) == 2  # never over an existing export
    assert "already exists" in capsys.readouterr().err
    # vllm: vLLM's view of a one-layer model of the base model's shape, the released config inside
    assert main([*args[:-4], "--format", "vllm", "--base", str(base), "--out", str(tmp_path / "vllm")]) == 0
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    base_config = tiny_llama().config
    assert config["architectures"] == ["MLPSpeculatorPreTrainedModel"] and config["num_hidden_layers"] == 1
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        base_config.hidden_size, base_config.num_attention_heads, base_config.num_key_value_heads,
        base_config.hidden_size // base_config.num_attention_heads)
    assert MLPSpeculatorConfig.from_dict(config["mlpspec_speculator"]) == load_speculator(tmp_path / "arctic").config
    vllm_tensors, released_tensors = (load_file(tmp_path / f / "model.safetensors") for f in ("vllm", "arctic"))
    assert vllm_tensors.keys() == released_tensors.keys()
    assert all(torch.equal(vllm_tensors[k], released_tensors[k]) for k in vllm_tensors)
    draft = MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=2, draft_vocab_size=8))
    draft.set_draft_vocab(torch.arange(50, 58))
    draft.save_pretrained(tmp_path / "draft")
    assert main(["export", "--speculator", str(tmp_path / "draft"), "--format", "ibm", "--base", str(base),
                 "--out", str(tmp_path / "x")]) == 2
    assert "draft vocabulary" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # the vllm drafter runs mlpspec's own heads: a draft vocabulary is kept, token ids and all
    assert main(["export", "--speculator", str(tmp_path / "draft"), "--format", "vllm", "--base", str(base),
                 "--out", str(tmp_path / "vllm-draft")]) == 0
    config = json.loads((tmp_path / "vllm-draft" / "config.json").read_text())
    kept = MLPSpeculator(MLPSpeculatorConfig.from_dict(config["mlpspec_speculator"]))
    kept.load_state_dict({k.removeprefix("speculator."): v
                          for k, v in load_file(tmp_path / "vllm-draft" / "model.safetensors").items()})
    same_outputs(kept, draft, 32, 64, 2)
    assert kept.draft_vocab.tolist() == list(range(50, 58))
    # a speculator of another width than the base: one line, nothing written
    MLPSpeculator(MLPSpeculatorConfig(vocab_size=64, emb_dim=48, n_predict=2)).save_pretrained(tmp_path / "wide")
    capsys.readouterr()
    assert main(["export", "--speculator", str(tmp_path / "wide"), "--format", "vllm", "--base", str(base),
                 "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "emb_dim 48 does not match the base model's hidden size 32" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_decode_losslessly(tmp_path, name):
    """Each released config's tree shape, at reduced size, over a tiny base of matching
    width, exported and read back: greedy output equals the base model's own."""
    from mlpspec.generate import speculative_generate

    d, m, h, top_k, n, V, tied = RELEASED[name]
    hidden, vocab = 8 * math.ceil(d / 512), math.ceil(V / 256)
    base = tiny_llama(seed=1, vocab=vocab, hidden=hidden)
    cfg = MLPSpeculatorConfig(vocab_size=vocab, emb_dim=hidden, inner_dim=m // 64, n_predict=h,
                              top_k_tokens_per_head=top_k, n_candidates=n, tie_weights=tied, scale_input=tied)
    torch.manual_seed(2)
    out = export_speculator(MLPSpeculator(cfg), tmp_path / "ibm", "ibm", base_model_name_or_path="org/base")
    speculator = load_speculator(out)
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    expected = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    got = speculative_generate(base, speculator, ids, mask, max_new_tokens=20, eos_token_id=[])
    assert got.sequences.tolist() == expected.tolist()
    assert got.stats.shapes.get(f"{top_k}x{n}", 0) >= 10  # the released tree shape was what got verified
