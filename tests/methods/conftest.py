"""Fixtures every method test shares: one torch thread, and the tiny model folders by name."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models on one intra-op thread: on a busy 2-core machine two OpenMP threads spin-wait
    on each other and a 10-step tiny-model loop went from 0.6 s to 15 s."""
    yield


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tiny_bert_dir):
    """The tiny model folders by fixture name (the methods' BACKBONES table refers to them so)."""
    return {"tiny_llama_dir": tiny_llama_dir, "tiny_bert_dir": tiny_bert_dir}
