"""Shared fixtures: tiny random LLaMA models (honest for loop/cache logic) and the real SmolLM2; the `real_model`
mark (pytest.ini) on every test that loads real weights. The helpers behind the fixtures are in helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_tiny_llama, make_tiny_tokenizer, save_model  # noqa: E402

# Modules whose every test loads real weights (the packaged SmolLM2 GGUF, its conversion, or a real pair).
REAL_MODEL_MODULES = {"test_backend_llamacpp.py", "test_models.py"}


def pytest_collection_modifyitems(config, items):
    """Mark `real_model` every test that uses the `smollm2` fixture or lives in REAL_MODEL_MODULES; tests that
    load real weights another way (load("smollm2-135m"), a subprocess on the real model) carry the mark
    themselves. `make test-fast` deselects them."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()) or item.path.name in REAL_MODEL_MODULES:
            item.add_marker(pytest.mark.real_model)


THREADS = torch.get_num_threads()   # torch's default for this machine


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before each test's fixtures (module-scoped ones included): one intra-op thread unless the test loads real
    weights. The tiny random models do not gain from a second thread, and on a busy 2-core machine OpenMP spinning
    made a test of 600 tiny decodes take minutes instead of seconds. Real models keep torch's default."""
    torch.set_num_threads(THREADS if item.get_closest_marker("real_model") else 1)


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
    from runtimes.loading import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_llama, tiny_tokenizer) -> str:
    """The tiny random LLaMA (context length 2,048) and its tokenizer, saved once as a local HF folder."""
    return save_model(tmp_path_factory.mktemp("tiny"), tiny_llama, tiny_tokenizer)
