"""Shared fixtures: tiny random LLaMA models (honest for loop/cache logic) and the real SmolLM2."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "\u201cMy dear Mr. Bennet,\u201d said his lady to him one day, \u201chave you heard that "
    "Netherfield Park is let at last?\u201d",
    "Mr. Bennet replied that he had not. \u201cBut it is,\u201d returned she; \u201cfor Mrs. Long "
    "has just been here, and she told me all about it.\u201d",
]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on a few sentences: a real tokenizer, different from SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A randomly initialised LLaMA small enough to run hundreds of decode steps in a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a busy machine (no OpenMP spinning)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_pair(tiny_tokenizer):
    """(big, small): two different random models over the same tokenizer."""
    n = len(tiny_tokenizer)
    return make_tiny_llama(n, seed=0, layers=3), make_tiny_llama(n, seed=1, layers=1, hidden=32)


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged SmolLM2-135M (float32, the default dtype), converted once into the cache."""
    from corpus_tools.models import load

    return load("smollm2-135m")
