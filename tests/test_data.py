import json
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from mlpspec import MLPSpecError
from mlpspec.data import (
    Windows,
    default_corpus_files,
    generate_shards,
    load_generations,
    load_texts,
    pad_windows,
    resolve_data,
    self_written_prompts,
    split_heldout,
    tokenized_corpus,
)


def test_default_corpus_is_the_stdlib_without_site_packages():
    files = default_corpus_files()
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert len(files) > 500


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "w3"}) + "\n" + json.dumps({"text": "w4 w5"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["w6", "w7"]}), tmp_path / "c.parquet")
    texts = load_texts([str(tmp_path)], tiny_tokenizer())
    assert sorted(texts) == ["w1 w2", "w3", "w4 w5", "w6", "w7"]


def test_plain_text_needs_no_datasets_package(tmp_path, monkeypatch):
    # a lent GPU machine had no `datasets`; train --data README.md failed there on the import
    (tmp_path / "a.md").write_text("w1 w2")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "w3"}) + "\n")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises
    assert load_texts([str(tmp_path / "a.md")], tiny_tokenizer()) == ["w1 w2"]
    with pytest.raises(ImportError):
        load_texts([str(tmp_path)], tiny_tokenizer())


def test_chat_messages_go_through_the_template(tmp_path):
    from test_text import CHAT_TEMPLATE

    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "w1"}]}) + "\n")
    assert load_texts([str(tmp_path / "chat.jsonl")], tok) == ["<s> user w1 </s> "]


@pytest.mark.parametrize(
    "setup, spec, message",
    [
        (lambda p: None, "missing.txt", "missing.txt: no such file or folder"),
        (lambda p: (p / "empty").mkdir(), "empty", "no .txt/.py/.md/.rst/.jsonl/.json/.parquet files"),
        (lambda p: (p / "e.txt").write_text(""), "e.txt", "no text found"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "w1"}\n'), "x.jsonl", "no field 'text' .*columns are body"),
    ],
)
def test_bad_data(tmp_path, monkeypatch, setup, spec, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(MLPSpecError, match=message):
        load_texts([spec], tiny_tokenizer())


def test_hub_names_are_told_apart_from_paths():
    files, hub = resolve_data(["org/dataset"])
    assert files == [] and hub == ["org/dataset"]


def test_tokenized_corpus_is_cached(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    (tmp_path / "b.txt").write_text("w4")
    tok = tiny_tokenizer()
    tokens = tokenized_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tok, tmp_path / "cache")
    assert list(tokens) == [5, 6, 7, 2, 8, 2]  # each document ends with EOS (2)
    cached = list((tmp_path / "cache").glob("tokens-*.npy"))
    assert len(cached) == 1
    again = tokenized_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tok, tmp_path / "cache")
    assert list(again) == list(tokens) and isinstance(again, np.memmap)


def test_windows_are_a_pure_function_of_the_index():
    tokens = np.arange(100, dtype=np.int32)
    windows = Windows(tokens, 10, seed=3)
    first = windows.get(range(0, 25))
    assert first.shape == (25, 10)
    assert torch.equal(Windows(tokens, 10, seed=3).get([7, 21]), first[[7, 21]])
    starts = sorted(int(w[0]) for w in first[:10])
    assert starts == list(range(0, 100, 10))  # one epoch visits every window once
    assert not torch.equal(first[:10], first[10:20])  # the next epoch is reshuffled
    with pytest.raises(MLPSpecError, match="fewer than one window"):
        Windows(tokens[:5], 10, seed=0)


def test_split_heldout_takes_the_tail():
    train, held = split_heldout(np.arange(10_000), fraction=0.01, minimum=100)
    assert len(held) == 100 and held[0] == 9900 and len(train) == 9900


def test_generate_shards_resume_reproduces_the_run(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    tokens = np.random.default_rng(0).integers(3, 64, 500).astype(np.int32)
    kwargs = dict(batch_size=3, prompt_length=5, new_tokens=6, temperature=1.0, top_k=10, seed=1)
    files = generate_shards(model, tok, tokens, tmp_path / "a", range(3), **kwargs)
    assert [f.name for f in files] == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    rows = load_generations(files)
    assert len(rows) == 9 and all(6 <= len(r) <= 11 for r in rows)  # prompt, then up to 6 (EOS may stop it)
    files[1].unlink()  # as if killed before shard 1 was written
    reported = []
    generate_shards(model, tok, tokens, tmp_path / "a", range(3), progress=lambda done, n: reported.append((done, n)),
                    **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(load_generations(files), rows))
    assert reported == [(1, 3), (2, 3), (3, 3)]  # the shards found on disk count as done


def test_generate_shards_answers_given_prompts_each_once_first(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    prompts = ["w3 w4", "w5 w6 w7", "w8", "w9 w10 w11 w12", "w13 w14"]
    kwargs = dict(batch_size=2, new_tokens=3, temperature=1.0, top_k=10, seed=1, prompts=prompts)
    no_tokens = np.zeros(0, dtype=np.int32)  # with prompts given, the corpus is not cut
    files = generate_shards(model, tok, no_tokens, tmp_path, range(3), **kwargs)
    asked = [tok.decode(p) for f in files for p in torch.load(f)["prompts"]]
    assert sorted(asked[:5]) == sorted(prompts) and asked[:5] != prompts  # all five once, in a seeded order
    assert asked[5] == asked[0]  # then round again in the same order
    assert all(len(c) >= 1 for f in files for c in torch.load(f)["continuations"])
    files[2].unlink()  # a resumed run answers the same prompts in that shard
    generate_shards(model, tok, no_tokens, tmp_path, [2], **kwargs)
    assert [tok.decode(p) for p in torch.load(files[2])["prompts"]] == asked[4:]


def test_pad_windows():
    windows, valid = pad_windows([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])], 4, pad=0)
    assert windows.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert valid.tolist() == [[True, True, True, False], [True] * 4]


def test_generated_positions_mark_what_the_base_model_wrote(tmp_path):
    from mlpspec.data import generated_positions

    file = tmp_path / "shard-00000.pt"
    torch.save({"prompts": [torch.tensor([1, 2]), torch.tensor([3, 4, 5])],
                "continuations": [torch.tensor([6, 7, 8]), torch.tensor([9])]}, file)
    windows, valid = pad_windows(load_generations([file]), 5, pad=0)
    assert windows.tolist() == [[1, 2, 6, 7, 8], [3, 4, 5, 9, 0]]
    assert generated_positions([file], 5).int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]]


def test_self_written_prompts_are_the_models_finished_requests():
    from test_text import CHAT_TEMPLATE

    from mlpspec.generate import speculative_generate

    model, tok = tiny_llama(), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    kwargs = dict(batch_size=8, max_tokens=12, seed=3)
    prompts = self_written_prompts(model, tok, 4, **kwargs)
    # what the model wrote after "<s> user " in the first batches, with the same seeds
    opening = torch.tensor([[1, 3]] * 8)
    finished, cut = [], 0
    for batch in range(8):
        out = speculative_generate(model, None, opening, torch.ones_like(opening), max_new_tokens=12, temperature=1.0,
                                   generator=torch.Generator().manual_seed(3 * 1_000_003 + batch))
        for r in range(8):
            new = out.sequences[r, 2 : 2 + int(out.stats.emitted[r])].tolist()
            if new[-1] == 2 and len(new) > 1:
                finished.append(tok.decode(new[:-1], skip_special_tokens=True))
            else:
                cut += 1
    assert cut > 0  # some were cut off at 12 tokens, and dropped
    distinct = list(dict.fromkeys(t for t in finished if t))
    assert [m[0]["content"] for m in prompts] == distinct[:4]
    assert all(m[0]["role"] == "user" and len(m) == 1 for m in prompts)
    assert self_written_prompts(model, tok, 4, **kwargs) == prompts  # seeded
    assert self_written_prompts(model, tok, 4, **(kwargs | {"seed": 4})) != prompts


def test_self_written_prompts_begin_with_the_leads_in_turn(tmp_path):
    from test_text import CHAT_TEMPLATE

    from mlpspec.generate import speculative_generate

    model, tok = tiny_llama(), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    kwargs = dict(batch_size=8, max_tokens=12, seed=3, leads=["w7 w8", "w9"])
    prompts = self_written_prompts(model, tok, 6, **kwargs)
    # batch i continues "<s> user " and its lead's tokens, with batch i's seed
    finished = []
    for batch in range(8):
        lead = [[11, 12], [13]][batch % 2]
        ids = torch.tensor([[1, 3] + lead] * 8)
        out = speculative_generate(model, None, ids, torch.ones_like(ids), max_new_tokens=12, temperature=1.0,
                                   generator=torch.Generator().manual_seed(3 * 1_000_003 + batch))
        P = ids.size(1)
        for r in range(8):
            new = out.sequences[r, P : P + int(out.stats.emitted[r])].tolist()
            if new[-1] == 2 and tok.decode(new[:-1], skip_special_tokens=True):  # words of its own
                finished.append(tok.decode(lead + new[:-1], skip_special_tokens=True))
    assert [m[0]["content"] for m in prompts] == list(dict.fromkeys(finished))[:6]
    texts = [m[0]["content"] for m in prompts]
    assert any(t.startswith("w7 w8 ") for t in texts) and any(t.startswith("w9 ") for t in texts)
    assert all(t.startswith(("w7 w8 ", "w9 ")) for t in texts)
    assert self_written_prompts(model, tok, 6, cache=tmp_path / "parts", **kwargs) == prompts
    with pytest.raises(MLPSpecError, match="holds requests sampled with other settings"):
        self_written_prompts(model, tok, 6, cache=tmp_path / "parts", **(kwargs | {"leads": ["w9"]}))
    for bad in ([], [""], ["w9", " "]):
        with pytest.raises(MLPSpecError, match="leads must be a non-empty list of non-empty strings"):
            self_written_prompts(model, tok, 6, leads=bad)


def test_self_written_prompts_need_finished_requests():
    from test_text import CHAT_TEMPLATE

    model, tok = tiny_llama(), tiny_tokenizer()
    with pytest.raises(MLPSpecError, match="no chat template"):
        self_written_prompts(model, tok, 2)
    tok.chat_template = CHAT_TEMPLATE
    with pytest.raises(MLPSpecError, match="finished only 0 distinct requests of 2 asked within 1 tokens"):
        self_written_prompts(model, tok, 2, max_tokens=1)  # one token: never a request and its end


def test_self_written_prompts_resume_from_their_batches(tmp_path):
    from test_text import CHAT_TEMPLATE

    model, tok = tiny_llama(), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    kwargs = dict(batch_size=8, max_tokens=12, seed=3)
    prompts = self_written_prompts(model, tok, 4, **kwargs)
    assert self_written_prompts(model, tok, 4, cache=tmp_path / "parts", **kwargs) == prompts
    batches = sorted((tmp_path / "parts").glob("batch-*.json"))
    assert len(batches) >= 2
    batches[-1].unlink()  # as if killed before the last batch was written: made again, the same
    assert self_written_prompts(model, tok, 4, cache=tmp_path / "parts", **kwargs) == prompts
    batches[0].write_text(json.dumps(["w9 w9 w9"]))  # a batch on disk is read, not sampled again
    again = self_written_prompts(model, tok, 4, cache=tmp_path / "parts", **kwargs)
    assert again[0][0]["content"] == "w9 w9 w9"
    with pytest.raises(MLPSpecError, match="holds requests sampled with other settings"):
        self_written_prompts(model, tok, 4, cache=tmp_path / "parts", **(kwargs | {"seed": 4}))
