import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import mlpspec.checkpoint as checkpoint
from mlpspec import MLPSpecError, MLPSpeculator, MLPSpeculatorConfig, load_speculator
from reference_impl import ReferenceSpeculator


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=13, emb_dim=12, inner_dim=8, n_predict=3)
    cfg.update(kw)
    model = MLPSpeculator(MLPSpeculatorConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norm parameters off their init, so a mix-up would show
            p.add_(torch.randn_like(p) * 0.1)
    return model


def assert_same_model(a, b):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(
    "kw",
    [{}, dict(tie_weights=True), dict(scale_input=True, inner_dim=0), dict(tie_weights=True, n_predict=2)],
)
def test_round_trip_is_bit_exact(tmp_path, kw):
    model = make(**kw)
    model.save_pretrained(tmp_path / "spec")
    loaded = MLPSpeculator.from_pretrained(tmp_path / "spec")
    assert_same_model(model, loaded)
    if model.config.tie_weights:
        assert loaded.emb[1].weight is loaded.emb[0].weight
        assert loaded.num_parameters() == model.num_parameters()
    state, ids = torch.randn(2, 4, 12), torch.randint(0, 13, (2, 4 + model.config.n_predict))
    assert torch.equal(model(state, ids), loaded(state, ids))


def test_round_trip_keeps_dtype(tmp_path):
    model = make().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = MLPSpeculator.from_pretrained(tmp_path)
    assert loaded.proj[0].weight.dtype == torch.bfloat16
    assert_same_model(model, loaded)
    assert MLPSpeculator.from_pretrained(tmp_path, dtype=torch.float32).proj[0].weight.dtype == torch.float32


# (emb_dim, inner_dim, n_predict, top_k_tokens_per_head, n_candidates, vocab, tie+scale)
RELEASED = {
    "llama-13b-accelerator": (5120, 4096, 3, [5, 3, 2], 5, 32000, False),
    "llama3-8b-accelerator": (4096, 3072, 4, [4, 3, 2, 2], 5, 128256, False),
    "llama2-70b-accelerator": (8192, 8192, 4, [4, 3, 2, 2], 4, 32000, True),
    "granite-7b-lab-accelerator": (4096, 4096, 5, [4, 3, 2, 2, 2], 5, 32008, False),
    "granite-3b-code-instruct-accelerator": (2560, 4096, 5, [4, 3, 2, 2, 2], 5, 49152, False),
    "granite-20b-code-instruct-accelerator": (6144, 4096, 4, [4, 3, 2, 2], 4, 49152, False),
    "llama-160m-accelerator": (768, 1024, 3, [5, 3, 2], 5, 32000, False),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_names_and_shapes(tmp_path, name):
    d, m, h, top_k, n, V, tied = RELEASED[name]
    # Same structure at 1/64 of the width and 1/256 of the vocabulary, so it runs in ms.
    d, m, V = d // 64, m // 64, math.ceil(V / 256)
    cfg = MLPSpeculatorConfig(
        vocab_size=V, emb_dim=d, inner_dim=m, n_predict=h, top_k_tokens_per_head=top_k,
        n_candidates=n, tie_weights=tied, scale_input=tied,
    )
    MLPSpeculator(cfg).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mlp_speculator"
    assert config["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    for key, value in dict(vocab_size=V, emb_dim=d, inner_dim=m, n_predict=h, top_k_tokens_per_head=top_k,
                           n_candidates=n, tie_weights=tied, scale_input=tied, torch_dtype="float32").items():
        assert config[key] == value, key

    expected = {}
    for i in range(h):
        expected[f"speculator.emb.{i}.weight"] = [V, m]
        expected[f"speculator.proj.{i}.weight"] = [m, d] if i == 0 else [m, m]
        expected[f"speculator.head.{i}.weight"] = [V, m]
        expected[f"speculator.ln.{i}.weight"] = [m]
        expected[f"speculator.ln.{i}.bias"] = [m]
    if tied:  # stored once, under the lowest index
        expected = {k: v for k, v in expected.items()
                    if ".0." in k or k == "speculator.proj.1.weight"}
    tensors = load_file(tmp_path / "model.safetensors")
    assert {k: list(t.shape) for k, t in tensors.items()} == expected
    assert MLPSpeculator.from_pretrained(tmp_path).config == cfg


@pytest.mark.parametrize("tie,scale", [(False, False), (True, True)])
def test_reference_reads_ours(tmp_path, tie, scale):
    model = make(tie_weights=tie, scale_input=scale, vocab_size=7)
    model.save_pretrained(tmp_path)
    ref = ReferenceSpeculator.load(tmp_path)
    state, ids = torch.randn(2, 5, 12), torch.randint(0, 7, (2, 8))
    torch.testing.assert_close(ref.forward(state, ids), model(state, ids), atol=1e-5, rtol=1e-5)
    last = torch.tensor([[3], [0]])
    candidates, _ = model.propose(state[:, :1], last, [3, 2, 2], 5)
    assert candidates.tolist() == [[p for p, _ in row] for row in ref.propose(state[:, :1], last, [3, 2, 2], 5)]


@pytest.mark.parametrize("tie,scale", [(False, False), (True, True)])
def test_ours_reads_reference(tmp_path, tie, scale):
    source = make(seed=5, tie_weights=tie, scale_input=scale, vocab_size=7)
    ref = ReferenceSpeculator(source.config.to_dict(),
                              {f"speculator.{k}": v for k, v in source.state_dict().items()})
    ref.save(tmp_path)  # every tied tensor under every name
    model = MLPSpeculator.from_pretrained(tmp_path)
    state, ids = torch.randn(2, 5, 12), torch.randint(0, 7, (2, 8))
    torch.testing.assert_close(model(state, ids), ref.forward(state, ids), atol=1e-5, rtol=1e-5)
    last = torch.tensor([[6], [2]])
    candidates, _ = model.propose(state[:, :1], last, [3, 2, 2], 5)
    assert candidates.tolist() == [[p for p, _ in row] for row in ref.propose(state[:, :1], last, [3, 2, 2], 5)]
    chains = [ref.chain(state[b, 0], last[b, 0]) for b in range(2)]  # the reference's own top-1 path
    assert chains == [row[0][0] for row in ref.propose(state[:, :1], last, [1, 1, 1], 1)]
    assert chains == model.propose(state[:, :1], last, [1, 1, 1], 1)[0][:, 0].tolist()


def test_tied_copies_that_differ_are_refused(tmp_path):
    model = make(tie_weights=True)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["speculator.emb.2.weight"] = tensors["speculator.emb.0.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MLPSpecError, match="speculator.emb.2.weight differs from speculator.emb.0.weight"):
        MLPSpeculator.from_pretrained(tmp_path)


def test_tied_tensor_stored_under_a_later_name(tmp_path):
    model = make(tie_weights=True)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["speculator.head.2.weight"] = tensors.pop("speculator.head.0.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same_model(model, MLPSpeculator.from_pretrained(tmp_path))


def test_unprefixed_tensor_names_load(tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    tensors = {k.removeprefix("speculator."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same_model(model, MLPSpeculator.from_pretrained(tmp_path))


def write_sharded(folder, model):
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / shard)
        weight_map.update({n: shard for n in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_index_loads(tmp_path):
    model = make(tie_weights=True)
    write_sharded(tmp_path, model)
    assert_same_model(model, MLPSpeculator.from_pretrained(tmp_path))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MLPSpecError, match="model-00002-of-00002.safetensors: shard listed in"):
        MLPSpeculator.from_pretrained(tmp_path)


def test_pytorch_bin_loads(tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert_same_model(model, MLPSpeculator.from_pretrained(tmp_path))


def test_saving_over_a_sharded_folder_leaves_one_source(tmp_path):
    write_sharded(tmp_path, make(seed=1))
    newer = make(seed=2)
    newer.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert_same_model(newer, MLPSpeculator.from_pretrained(tmp_path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch files left


def corrupt(tmp_path, edit):
    make().save_pretrained(tmp_path)
    edit(tmp_path)
    with pytest.raises(MLPSpecError) as info:
        MLPSpeculator.from_pretrained(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def edit_tensors(fn):
    def edit(folder):
        tensors = load_file(folder / "model.safetensors")
        fn(tensors)
        save_file(tensors, folder / "model.safetensors")
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: (f / "config.json").unlink(), "config.json: no such file"),
        (lambda f: (f / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00"), "config.json: not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "must be a JSON object"),
        (edit_config(medusa_num_heads=4), "unknown speculator config keys: medusa_num_heads"),
        (edit_config(n_predict="3"), "n_predict must be an integer"),
        (edit_config(model_type="eagle"), "model_type is 'eagle'"),
        (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors, model.safetensors.index.json"),
        (lambda f: (f / "model.safetensors").write_bytes(b"garbage" * 10), "not a readable safetensors file"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:300]),
         "not a readable safetensors file"),
        (edit_config(inner_dim=4), r"tensor speculator.emb.0.weight has shape \[13, 8\], the config asks for \[13, 4\]"),
        (edit_tensors(lambda t: t.update({"speculator.proj.1.weight": torch.zeros(8, 9)})),
         r"speculator.proj.1.weight has shape \[8, 9\]"),
        (edit_tensors(lambda t: t.pop("speculator.ln.2.bias")), "missing tensor speculator.ln.2.bias"),
        (edit_tensors(lambda t: t.update({"speculator.extra.weight": torch.zeros(1)})),
         "unexpected tensor speculator.extra.weight"),
        (edit_config(n_predict=2, top_k_tokens_per_head=[2, 2], n_candidates=4), "unexpected tensor speculator.emb.2.weight"),
    ],
)
def test_bad_folders_give_one_line_errors(tmp_path, edit, message):
    assert re.search(message, corrupt(tmp_path, edit))


def test_missing_folder(tmp_path):
    with pytest.raises(MLPSpecError, match="no such speculator folder"):
        MLPSpeculator.from_pretrained(tmp_path / "nope")
    with pytest.raises(MLPSpecError, match="no such folder, and not a hub id"):
        load_speculator(str(tmp_path / "nope" / "deeper" / "still"))


def test_load_speculator_folder(tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    assert_same_model(model, load_speculator(tmp_path))


def test_default_speculator(monkeypatch, tmp_path):
    default = checkpoint.default_speculator_folder()
    if (default / "config.json").is_file():
        speculator = load_speculator()  # loads the default base itself when the default shares its embeddings
        assert speculator.config.vocab_size == 49152 and not speculator.emb[0].weight.is_meta
    else:
        with pytest.raises(MLPSpecError, match="no trained default speculator ships"):
            load_speculator()


def test_hub_id_from_local_cache(monkeypatch, tmp_path):
    """The hub path, offline: a mirror laid out as huggingface_hub lays out its cache."""
    import huggingface_hub.constants as constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--ibm-fms--tiny-accelerator"
    model = make()
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_same_model(model, load_speculator("ibm-fms/tiny-accelerator"))
    with pytest.raises(MLPSpecError, match="ibm-fms/absent: could not fetch"):
        load_speculator("ibm-fms/absent")


def test_tie_base_embeddings_share_the_base_and_are_not_stored(tmp_path):
    from conftest import tiny_llama
    from mlpspec import speculator_config_for

    base = tiny_llama()
    model = MLPSpeculator(speculator_config_for(base, n_predict=3, tie_base_embeddings=True))
    assert model.emb[0].weight.is_meta  # nothing allocated until the base is attached
    model.attach_base(base)
    assert model.emb[2].weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    assert model.head[1].weight.data_ptr() == base.get_output_embeddings().weight.data_ptr()
    assert not model.emb[0].weight.requires_grad and model.proj[0].weight.requires_grad
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert sorted(stored) == sorted(f"speculator.{k}" for k in
                                    ["proj.0.weight", "proj.1.weight", "proj.2.weight"]
                                    + [f"ln.{i}.{p}" for i in range(3) for p in ("weight", "bias")])
    with pytest.raises(MLPSpecError, match="shares the base model's embeddings; pass the base model"):
        load_speculator(tmp_path)
    loaded = load_speculator(tmp_path, base=base)
    state, ids = torch.randn(2, 4, 32), torch.randint(0, 64, (2, 7))
    assert torch.equal(loaded(state, ids), model(state, ids))
    # it lands where the base model is (the meta device stands in for a GPU here)
    assert {p.device.type for p in load_speculator(tmp_path, base=tiny_llama().to("meta")).parameters()} == {"meta"}
    with pytest.raises(MLPSpecError, match="attach_base is for speculators made with tie_base_embeddings"):
        make().attach_base(base)
    with pytest.raises(MLPSpecError, match="do not fit"):
        MLPSpeculator(speculator_config_for(tiny_llama(vocab=80), tie_base_embeddings=True)).attach_base(base)
    with pytest.raises(MLPSpecError, match="needs inner_dim == emb_dim"):
        MLPSpeculatorConfig(vocab_size=64, emb_dim=32, inner_dim=16, tie_base_embeddings=True)


def test_emb_adapter_round_trip_and_identity_start(tmp_path):
    from conftest import tiny_llama
    from mlpspec import speculator_config_for

    base = tiny_llama()  # hidden size 32
    common = dict(n_predict=3, tie_base_embeddings=True, tie_weights=True, draft_vocab_size=8,
                  top_k_tokens_per_head=[2, 2, 1], n_candidates=2)
    torch.manual_seed(0)
    plain = MLPSpeculator(speculator_config_for(base, **common))
    adapted = MLPSpeculator(speculator_config_for(base, emb_adapter=True, **common))
    for model in (plain, adapted):
        model.attach_base(base)
    adapted.load_state_dict(plain.state_dict(), strict=False)
    state, ids = torch.randn(2, 4, 32), torch.randint(0, 64, (2, 7))
    assert torch.equal(adapted(state, ids), plain(state, ids))  # the identity map: the tied speculator itself

    torch.manual_seed(1)
    wide = MLPSpeculator(speculator_config_for(base, emb_adapter=True, inner_dim=48, **common))
    wide.attach_base(base)
    assert wide.emb_adapter[2].weight is wide.emb_adapter[0].weight  # tie_weights: one map
    with torch.no_grad():
        wide.emb_adapter[0].weight.add_(torch.randn(48, 32))
    wide.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert [k for k in stored if "emb" in k] == ["speculator.emb_adapter.0.weight"]  # once; emb is the base's
    assert stored["speculator.emb_adapter.0.weight"].shape == (48, 32)
    loaded = load_speculator(tmp_path, base=base)
    assert torch.equal(loaded(state, ids), wide(state, ids))
    with pytest.raises(MLPSpecError, match="emb_adapter maps the base model's embedding"):
        MLPSpeculatorConfig(vocab_size=64, emb_dim=32, emb_adapter=True)
    with pytest.raises(MLPSpecError, match="heads tied to the base LM head read width emb_dim"):
        MLPSpeculatorConfig(vocab_size=64, emb_dim=32, inner_dim=48, tie_base_embeddings=True, emb_adapter=True)


def test_draft_vocabulary_round_trip(tmp_path):
    from conftest import tiny_llama
    from mlpspec import speculator_config_for

    base = tiny_llama()
    model = MLPSpeculator(speculator_config_for(base, n_predict=2, tie_base_embeddings=True, draft_vocab_size=8,
                                                tie_weights=True, top_k_tokens_per_head=[3, 2]))
    model.attach_base(base)
    ids = torch.tensor([2, 3, 5, 8, 13, 21, 34, 55])
    model.set_draft_vocab(ids, base=base)
    assert torch.equal(model.head[0].weight, base.lm_head.weight[ids])  # starts from the base's rows
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert torch.equal(stored["speculator.draft_vocab"], ids)
    assert "speculator.head.0.weight" in stored and "speculator.emb.0.weight" not in stored
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 8
    loaded = load_speculator(tmp_path, base=base)
    assert torch.equal(loaded.draft_vocab, ids) and loaded.draft_vocab.dtype == torch.int64
    state = torch.randn(2, 1, 32)
    last = torch.tensor([[4], [9]])
    assert torch.equal(loaded.propose(state, last)[0], model.propose(state, last)[0])
