"""oneDNN's prepacked linears (kernels.py): the same numbers within float rounding, and
decoding on them as lossless as on PyTorch's own kernels."""

import pytest
import torch

import mlpspec.base as base
import mlpspec.kernels as kernels
from conftest import TINY_VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2
from mlpspec import MLPSpecError, MLPSpeculator, run_base, speculator_config_for
from mlpspec.cache import SMALLEST_TREE_WIDTH
from mlpspec.generate import speculative_generate
from mlpspec.kernels import can_pack, kernels_for, kernels_of, use_kernels

pytestmark = pytest.mark.skipif(not can_pack(torch.float32), reason="this PyTorch build has no oneDNN")
ARCHITECTURES = pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])


@pytest.fixture
def onednn_calls(monkeypatch):
    """How many matmuls went to oneDNN."""
    calls = []
    onednn = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda *args: calls.append(args[0].shape) or onednn(*args))
    return calls


@ARCHITECTURES
def test_packed_linears_give_pytorchs_numbers_within_rounding(build, onednn_calls):
    model = build(seed=3)
    ids = torch.randint(3, TINY_VOCAB, (2, 7))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        assert use_kernels(model) == "onednn" and kernels_of(model) == "onednn"
        packed = run_base(model, ids).logits
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(onednn_calls) == linears  # GPT-2's Conv1D layers are no linears: only its head goes
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)


@ARCHITECTURES
def test_greedy_on_packed_kernels_equals_transformers(build, onednn_calls):
    model = build(seed=1)
    torch.manual_seed(1)
    ids = torch.randint(3, TINY_VOCAB, (2, 9))
    expected = model.generate(input_ids=ids, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    use_kernels(model, "onednn")
    with kernels_for(model):  # transformers on the same kernels
        same_kernels = model.generate(input_ids=ids, max_new_tokens=25, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
    torch.manual_seed(0)
    speculator = MLPSpeculator(speculator_config_for(model, n_predict=3, inner_dim=16)).eval()
    for spec in (None, speculator):
        out = speculative_generate(model, spec, ids, max_new_tokens=25, eos_token_id=[], lookup=3)
        assert out.sequences.tolist() == same_kernels.tolist() == expected.tolist()
    assert onednn_calls


def test_bfloat16_weights_are_read_in_float32_from_many_rows_where_onednn_packs_only_float32(monkeypatch,
                                                                                            onednn_calls):
    """As on an AVX2-only CPU: below WIDEN_FROM_ROWS rows PyTorch's own bfloat16 kernels run,
    from there oneDNN over a float32 copy, which sums the same exact products."""
    monkeypatch.setattr(kernels, "can_pack", lambda dtype: dtype == torch.float32)
    model = tiny_llama(seed=4).to(torch.bfloat16)
    assert use_kernels(model) == "onednn"
    few = torch.randint(3, TINY_VOCAB, (1, kernels.WIDEN_FROM_ROWS - 1))
    many = torch.randint(3, TINY_VOCAB, (2, kernels.WIDEN_FROM_ROWS))
    with torch.no_grad():
        assert torch.equal(run_base(model, few).logits, model(input_ids=few).logits) and not onednn_calls
        torch.testing.assert_close(run_base(model, many).logits, model(input_ids=many).logits, rtol=0.02, atol=0.02)
    assert onednn_calls and all(shape[:-1].numel() >= kernels.WIDEN_FROM_ROWS for shape in onednn_calls)


def test_use_kernels_refuses_what_it_cannot_do():
    model = tiny_llama()
    with pytest.raises(MLPSpecError, match="kernels must be one of auto, onednn, aten, compiled, got 'mkl'"):
        use_kernels(model, "mkl")
    assert use_kernels(model, "aten") == "aten" and kernels_of(model) == "aten"
    half = tiny_llama().to(torch.float16)
    assert use_kernels(half) == "aten"  # auto: where oneDNN packs nothing, PyTorch's own
    with pytest.raises(MLPSpecError, match="oneDNN cannot pack float16 weights on cpu here"):
        use_kernels(half, "onednn")


def test_unrouted_classes_of_passes_run_on_pytorchs_kernels(onednn_calls):
    """unroute: passes of fewer than FEW_ROWS tokens are "few", the others "many"; a class
    left unrouted never reaches oneDNN, the other still does."""
    model = tiny_llama(seed=6)
    assert use_kernels(model) == "onednn"
    kernels.unroute(model, {"few"})
    assert kernels_of(model) == "onednn, many rows"
    assert not isinstance(kernels_for(model, kernels.FEW_ROWS - 1), kernels.PackedLinears)
    assert isinstance(kernels_for(model, kernels.FEW_ROWS), kernels.PackedLinears)
    assert isinstance(kernels_for(model), kernels.PackedLinears)  # rows not known: "many"
    few, many = torch.randint(3, TINY_VOCAB, (1, 3)), torch.randint(3, TINY_VOCAB, (2, 2))
    with torch.no_grad():
        assert torch.equal(run_base(model, few).logits, model(input_ids=few).logits) and not onednn_calls
        run_base(model, many)  # 4 rows in all
    assert onednn_calls and all(shape[:-1].numel() == 4 for shape in onednn_calls)
    kernels.unroute(model, {"few", "many"})
    assert kernels_of(model) == "aten" and not isinstance(kernels_for(model), kernels.PackedLinears)
    assert use_kernels(model) == "onednn" and kernels_of(model) == "onednn"  # a fresh choice routes everything


@pytest.mark.parametrize("own_costs, expected", [({"1": 40.0, "16": 68.0}, "onednn, many rows"),
                                                 ({"1": 48.0, "16": 60.0}, "onednn, few rows"),
                                                 ({"1": 30.0, "16": 50.0}, "aten"),
                                                 ({"1": 49.0, "16": 69.0}, "onednn")])
def test_load_base_routes_to_onednn_only_where_it_was_timed_faster(tiny_llama_folder, monkeypatch, own_costs, expected):
    """Routed passes cost 50 / 70 ms for 1 / 16 tokens here: a class leaves the routing only
    where PyTorch's own kernels beat it by ROUTING_MARGIN (48 and 69 do not, 47 and 66 would),
    and the choice is kept: a second load times nothing."""
    timed = []

    def fake_costs(model):
        routed = kernels_of(model) == "onednn"
        timed.append(routed)
        return {"1": 50.0, "16": 70.0} if routed else own_costs

    monkeypatch.setattr(base, "pass_costs", fake_costs)
    model, _ = base.load_base(tiny_llama_folder)
    assert kernels_of(model) == expected and timed == [True, False]
    model, _ = base.load_base(tiny_llama_folder)
    assert kernels_of(model) == expected and len(timed) == 2
    assert kernels_of(base.load_base(tiny_llama_folder, kernels="onednn")[0]) == "onednn"  # asked for: no timing
    assert len(timed) == 2


def test_a_model_too_short_for_the_probe_keeps_the_routing():
    """GPT-2's learned positions end at n_positions: a model shorter than the probe is not
    timed (its passes would fail), and every pass stays routed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    assert use_kernels(model) == "onednn"
    assert base.route_kernels(model, "short").startswith("every pass routed: the probe needs")
    assert kernels_of(model) == "onednn"


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN packs no bfloat16 on this CPU")
def test_one_bfloat16_row_runs_on_pytorchs_own_kernels_and_more_on_onednn(onednn_calls):
    from mlpspec.kernels import oneDNN_off

    model = tiny_llama(seed=5).to(torch.bfloat16)
    assert use_kernels(model) == "onednn"
    one, many = torch.randint(3, TINY_VOCAB, (1, 1)), torch.randint(3, TINY_VOCAB, (1, 6))
    with torch.no_grad(), oneDNN_off():
        own = model(input_ids=one).logits, model(input_ids=many).logits
    with torch.no_grad():
        assert torch.equal(run_base(model, one).logits, own[0]) and not onednn_calls
        torch.testing.assert_close(run_base(model, many).logits, own[1], rtol=0.02, atol=0.02)
    assert onednn_calls
    assert torch._C._get_mkldnn_enabled()  # switched back on after the pass


@ARCHITECTURES
def test_greedy_on_the_compiled_static_path_equals_transformers(build, monkeypatch):
    """kernels "compiled": tree passes padded to bucketed widths on a static cache, through
    inductor's graphs (one per width, all built before the first step). float32 output stays
    transformers' own, token for token, with trees of several widths and ragged rows."""
    model = build(seed=1)
    torch.manual_seed(1)
    ids = torch.randint(3, TINY_VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert use_kernels(model, "compiled") == "compiled" and kernels_of(model) == "compiled"
    assert isinstance(kernels_for(model, 18), kernels.PackedLinears)  # the prompt's pass: "auto"'s kernels
    widths = []
    compiled = kernels.compiled_forward
    monkeypatch.setattr(base, "compiled_forward",
                        lambda m, **kw: widths.append(kw["input_ids"].size(1)) or compiled(m, **kw))
    torch.manual_seed(0)
    speculator = MLPSpeculator(speculator_config_for(model, n_predict=3, inner_dim=16)).eval()
    out = speculative_generate(model, speculator, ids, mask, max_new_tokens=20, eos_token_id=[], lookup=3,
                               top_k_tokens_per_head=[3, 2, 1], n_candidates=4)
    assert out.sequences.tolist() == expected.tolist()
    assert max(widths) > 1 and all(w & (w - 1) == 0 for w in widths), sorted(set(widths))  # powers of two
    built = sorted(set(widths))  # decode.build_graphs runs each width once, before any step of the batch
    assert sorted(widths[: len(built)]) == built
    # batch 1 without a speculator: every one-token pass padded to the smallest tree's graph
    widths.clear()
    alone = model.generate(input_ids=ids[1:], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    plain = speculative_generate(model, None, ids[1:], max_new_tokens=6, eos_token_id=[])
    assert plain.sequences.tolist() == alone.tolist()
    # five steps after the prefill's token, and a pass that builds the graph unless the batch
    # above built it when its first row finished
    assert widths in ([SMALLEST_TREE_WIDTH] * 5, [SMALLEST_TREE_WIDTH] * 6)
