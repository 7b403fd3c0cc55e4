"""A chain packed into a fed-back hidden state: the layout by hand, and a round trip in
every dtype the proposer's buffer may have."""

import pytest
import torch

from mlpspec import MLPSpecError
from mlpspec.chain_state import advance, current_tokens, is_packed, one_hot_logits, pack, width_needed


def test_a_packed_chain_by_hand():
    # 70000 = 1 * 256^2 + 17 * 256 + 112; 300 = 1 * 256 + 44
    rows = pack(torch.tensor([[1, 300, 70000]]), width=16, dtype=torch.float32)
    assert width_needed(3) == 14
    assert rows.tolist() == [[32768, -32768, 32768, 0, 3, 0, 0, 1, 0, 1, 44, 1, 17, 112, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_call_names_the_next_token_of_its_own_chain(dtype):
    chains = torch.tensor([[5, 49151, 0, 7], [123456, 2, 3, 4]])  # n D
    rows = pack(chains, width=576, dtype=dtype)
    named = []
    for _ in range(5):  # one call past the chain's end names its last token again
        assert bool(is_packed(rows).all())
        named.append(current_tokens(rows).tolist())
        rows = advance(rows)
    assert named == [[5, 123456], [49151, 2], [0, 3], [7, 4], [7, 4]]


def test_model_states_are_not_taken_for_chains():
    torch.manual_seed(0)
    states = torch.randn(64, 576) * 30
    assert not bool(is_packed(states).any()) and not bool(is_packed(states.bfloat16()).any())
    mixed = torch.cat([states[:2], pack(torch.tensor([[9]]), 576, torch.float32)])
    assert is_packed(mixed).tolist() == [False, False, True]


def test_one_hot_logits_draw_the_named_token_at_any_temperature():
    rows = advance(pack(torch.tensor([[3, 8], [1, 0]]), width=16, dtype=torch.bfloat16))
    logits = one_hot_logits(rows, vocab_size=10)  # n V
    assert logits.argmax(dim=-1).tolist() == [8, 0]
    probs = torch.softmax(logits.float() / 0.7, dim=-1)
    assert probs[0, 8] == 1.0 and probs[1, 0] == 1.0 and float(probs.sum()) == 2.0


def test_what_cannot_be_packed_is_one_clear_error():
    with pytest.raises(MLPSpecError, match="a chain of 4 drafts needs a hidden size of at least 17, the base model has 16"):
        pack(torch.zeros(1, 4, dtype=torch.long), width=16, dtype=torch.float32)
    with pytest.raises(MLPSpecError, match=r"token ids must lie in \[0, 16777216\)"):
        pack(torch.tensor([[2**24]]), width=16, dtype=torch.float32)
