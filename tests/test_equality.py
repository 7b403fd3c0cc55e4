import pytest
import torch

from conftest import tiny_llama
from mlpspec.equality import NEAR_TIE_ULPS, find_divergences, ulp


def test_ulp_by_hand():
    assert ulp(1.0, torch.bfloat16) == 2**-7
    assert ulp(20.0, torch.bfloat16) == 0.125  # 16 <= 20 < 32: 2**4 * 2**-7
    assert ulp(-40.0, torch.bfloat16) == 0.25
    assert ulp(0.75, torch.float32) == 2**-24


def test_find_divergences_measures_the_gap_at_the_first_difference():
    model = tiny_llama(seed=5)
    ids = torch.tensor([[0, 7, 8, 9], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    other = greedy.clone()
    with torch.no_grad():  # row 1 takes its second-best token at new position 3
        logits = model(greedy[1:, : 4 + 3]).logits[0, -1]
    top2 = logits.topk(2)
    other[1, 4 + 3] = top2.indices[1]

    found = find_divergences(model, ids, mask, other, greedy)
    assert len(found) == 1
    d = found[0]
    assert (d.row, d.index, d.ours, d.theirs) == (1, 3, int(top2.indices[1]), int(top2.indices[0]))
    assert d.gap == pytest.approx(float(top2.values[0] - top2.values[1]), rel=1e-5)
    # a float32 gap between a random model's two best logits spans very many float32 ulps
    assert d.ulps > 1000 and not d.near_tie
    assert find_divergences(model, ids, mask, greedy, greedy) == []
