from conftest import tiny_llama, tiny_tokenizer
from mlpspec.bench import chat_prompts, code_prompts, compare
from test_decode import random_speculator


def test_code_prompts_come_from_third_party_packages_and_end_at_a_def():
    prompts = code_prompts(6)
    assert len(prompts) == 6 and len(set(prompts)) == 6
    assert all(p.rstrip().split("\n")[-1].lstrip().startswith("def ") for p in prompts)


def test_chat_prompts_are_messages():
    prompts = chat_prompts()
    assert len(prompts) >= 10 and all(p[0]["role"] == "user" for p in prompts)


def test_compare_counts_every_token_and_checks_equality():
    model, tok = tiny_llama(), tiny_tokenizer()
    prompts = ["w1 w2 w3", "w4 w5", "w9 w9 w9 w9"]
    for adaptive in (False, True):
        result = compare(model, tok, random_speculator(model), prompts, chat=False, max_new_tokens=10, adaptive=adaptive)
        assert result.tokens == 30  # no EOS in a random tiny model's greedy text here, or it would stop early
        assert result.steps >= 3 and result.speculative_seconds > 0 and result.plain_seconds > 0
        assert result.tokens_per_step == result.tokens / result.steps
