import json

import pytest
import torch

from conftest import tiny_tokenizer
from mlpspec import MLPSpecError
from mlpspec.text import decode_new_tokens, encode_prompts, read_prompt_file, user_turn_opening, write_prompt_file

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> w0 {% endif %}"
)


def test_read_prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "w1 w2"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "w3"}]}) + "\n"
    )
    assert read_prompt_file(path) == ["w1 w2", [{"role": "user", "content": "w3"}]]


def test_write_prompt_file_reads_back(tmp_path):
    prompts = ["w1 w2", [{"role": "system", "content": "w3"}, {"role": "user", "content": "w4"}]]
    write_prompt_file(tmp_path / "p.jsonl", prompts)
    assert read_prompt_file(tmp_path / "p.jsonl") == prompts


def test_user_turn_opening():
    tok = tiny_tokenizer()
    with pytest.raises(MLPSpecError, match="no chat template"):
        user_turn_opening(tok)
    tok.chat_template = CHAT_TEMPLATE
    assert user_turn_opening(tok) == [1, 3]  # "<s> user ", 'user' unknown to the tiny vocabulary
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] | lower }} {% endfor %}"
    with pytest.raises(MLPSpecError, match="does not copy the user's message verbatim"):
        user_turn_opening(tok)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', "{oops"], r"prompts.jsonl:2: not valid JSON"),
        (['{"prompt": "a"}', '{"text": "b"}'], r"prompts.jsonl:2: expected an object with \"prompt\" or \"messages\""),
        (['{"prompt": ""}'], r"prompts.jsonl:1: \"prompt\" must be a non-empty string"),
        (['{"prompt": "a", "messages": []}'], r"prompts.jsonl:1: expected an object"),
        (['{"messages": [{"role": "user"}]}'], r"prompts.jsonl:1: \"messages\" must be a non-empty list"),
        (["", "  "], r"prompts.jsonl: no prompts"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MLPSpecError, match=message):
        read_prompt_file(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(MLPSpecError, match="cannot read prompt file"):
        read_prompt_file(tmp_path / "none.jsonl")


def test_encode_left_pads():
    ids, mask = encode_prompts(tiny_tokenizer(), ["w1 w2 w3", "w4"], chat=False)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encode_applies_the_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ids, _ = encode_prompts(tok, ["w1", [{"role": "w2", "content": "w3"}]], chat=True)
    # "<s> user w1 </s> <s> w0": 'user' is unknown to the tiny vocabulary (3)
    assert ids[0].tolist()[-6:] == [1, 3, 5, 2, 1, 4]
    assert ids[1].tolist()[-6:] == [1, 6, 7, 2, 1, 4]
    with pytest.raises(MLPSpecError, match="no chat template"):
        encode_prompts(tiny_tokenizer(), ["w1"], chat=True)


def test_decode_new_tokens_drops_padding():
    tok = tiny_tokenizer()
    sequences = torch.tensor([[5, 6, 7, 8, 2, 0], [5, 6, 9, 10, 11, 12]])
    assert decode_new_tokens(tok, sequences, 2, torch.tensor([3, 4])) == ["w3 w4", "w5 w6 w7 w8"]
