"""Tiny models built in the tests: Llama-, Qwen2- and GPT-2-type causal LMs, with a
word-level tokenizer, so nothing is downloaded and every test runs in seconds."""

import itertools

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mlpspec import run_base, speculator_config_for

TINY_VOCAB = 64


def tiny_llama(seed: int = 0, vocab: int = TINY_VOCAB, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0, vocab: int = TINY_VOCAB, hidden: int = 32) -> Qwen2ForCausalLM:
    """Qwen2-type: biases on the query, key and value projections, an untied LM head."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab: int = TINY_VOCAB, hidden: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def tiny_tokenizer(vocab: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class OracleSpeculator(torch.nn.Module):
    """A speculator that knows the base model's greedy continuation: child 0 at every stage
    carries the true next token (for the rows in `right`), so path 0, the top-1 chain, is
    the truth. Where wrong(p, j) holds for stage j at position p, child 0 is wrong and child 1
    carries the truth instead. Every other token is a fixed function of where
    decoding stands and of the path to it, so the tree cut to fewer stages is a prefix of
    the whole one, as in MLPSpeculator.expand, and reruns from the same point agree. It
    finds where decoding stands by matching the given hidden state against the reference
    run's hidden states (with `feature_layers`, the states after those layers too; each
    match's distance is kept in `distances`: 0 where the decoder handed over those states).
    `hidden` gives the reference run's states [b, T, (1+l)d] where they come from another
    runtime than transformers (the llama.cpp backend)."""

    def __init__(self, model, sequences, prompt_valid, n_predict=3, right=None, seed=0, wrong=None,
                 feature_layers=(), hidden=None):
        super().__init__()
        self.config = speculator_config_for(model, n_predict=n_predict, feature_layers=list(feature_layers))
        self.dtype = model.dtype
        valid = torch.cat([prompt_valid, torch.ones_like(sequences[:, prompt_valid.size(1):], dtype=torch.bool)], 1)
        self.hidden = hidden if hidden is not None else run_base(
            model, sequences, attention_mask=valid.long(),
            position_ids=(valid.long().cumsum(1) - 1).clamp(min=0), feature_layers=feature_layers,
        ).hidden  # b T (1+l)d
        self.sequences = sequences
        self.right = torch.ones(len(sequences), dtype=torch.bool) if right is None else right
        self.seed = seed
        self.wrong = wrong or (lambda p, j: False)
        self.distances = []

    def expand(self, state, last_token, top_k):
        """Every leaf, as MLPSpeculator.expand; a child's log-prob is minus its rank."""
        b, h, V = state.size(0), len(top_k), self.config.vocab_size
        choices = list(itertools.product(*[range(t) for t in top_k]))  # N paths of h child ranks
        paths = torch.empty(b, len(choices), h, dtype=torch.long)
        for r in range(b):
            # the reference row and position whose state made last_token (any row: an
            # engine's rows move as requests come and go)
            distances = (self.hidden - state[r, 0]).norm(dim=-1)  # B T
            at = int(distances.argmin())
            source, p = divmod(at, distances.size(1))
            self.distances.append(float(distances.flatten()[at]))
            truth = self.sequences[source, p + 2 : p + 2 + h].tolist()
            for n, path in enumerate(choices):
                on_truth = bool(self.right[source])
                for j, child in enumerate(path):
                    carrier = 1 if self.wrong(p, j) else 0
                    on_truth = on_truth and j < len(truth) and child == carrier
                    paths[r, n, j] = truth[j] if on_truth else 3 + hash((self.seed, p, path[: j + 1])) % (V - 3)
        ranks = torch.tensor(choices, dtype=torch.float).cumsum(dim=-1)  # N h
        return paths, (-ranks).expand(b, -1, -1)


@pytest.fixture(autouse=True)
def calibrations_apart(tmp_path_factory, monkeypatch):
    """Step costs, dtype and kernel timings the CLI keeps between calls go to a folder of the test's
    own, not to the user cache (the converted base model there is still found)."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setattr("mlpspec.decode.cache_dir", lambda: folder)
    monkeypatch.setattr("mlpspec.base.dtype_timings_dir", lambda: folder / "dtype")
    monkeypatch.setattr("mlpspec.base.kernel_timings_dir", lambda: folder / "kernels")
    return folder / "calibration"


@pytest.fixture
def tiny_llama_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def prefill_passes(lengths: list[int]) -> int:
    """The prefill passes the engine makes for prompts of these lengths joining at once."""
    from mlpspec.engine import PREFILL_PADDING, PREFILL_TOKENS
    from mlpspec.scheduler import prefill_groups

    return len(prefill_groups(lengths, PREFILL_TOKENS, PREFILL_PADDING))
