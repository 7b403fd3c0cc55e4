"""Tiny models built in the tests: a Llama-type and a GPT-2-type causal LM, with a
word-level tokenizer, so nothing is downloaded and every test runs in seconds."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    """Proposes the base model's true greedy continuation as its first candidate (for the
    rows in `right`; with wrong_every, some of its tokens are wrong), and random ones
    otherwise. It finds where decoding stands by matching the given hidden state against
    the reference run's hidden states."""

    def __init__(self, model, sequences, prompt_valid, n_predict=3, right=None, seed=0, wrong_every=0):
        super().__init__()
        self.config = speculator_config_for(model, n_predict=n_predict)
        self.dtype = model.dtype
        valid = torch.cat([prompt_valid, torch.ones_like(sequences[:, prompt_valid.size(1):], dtype=torch.bool)], 1)
        self.hidden = run_base(
            model, sequences, attention_mask=valid.long(),
            position_ids=(valid.long().cumsum(1) - 1).clamp(min=0),
        ).hidden  # b T d
        self.sequences = sequences
        self.right = torch.ones(len(sequences), dtype=torch.bool) if right is None else right
        self.generator = torch.Generator().manual_seed(seed)
        self.wrong_every = wrong_every  # > 0: the truth's token j at position p is wrong where (p + 2j) % it == 0

    def expand(self, state, last_token, top_k):
        """Every leaf, as MLPSpeculator.expand: the truth (or a random guess) is path 0,
        the top-1 chain, and scores best; the other paths are random."""
        b, h, n = state.size(0), len(top_k), math.prod(top_k)  # as many stages as asked for
        paths = torch.randint(3, self.config.vocab_size, (b, n, h), generator=self.generator)
        for r in range(b):
            if self.right[r]:
                p = int((self.hidden[r] - state[r, 0]).norm(dim=-1).argmin())  # state that made last_token
                truth = self.sequences[r, p + 2 : p + 2 + h].clone()
                if self.wrong_every:  # a fixed function of where decoding stands, so reruns agree
                    wrong = (p + 2 * torch.arange(len(truth))) % self.wrong_every == 0
                    truth = torch.where(wrong, 3 + (truth - 2) % (self.config.vocab_size - 3), truth)
                paths[r, 0, : len(truth)] = truth
        return paths, -torch.arange(n, dtype=torch.float).expand(b, n)


@pytest.fixture
def tiny_llama_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
