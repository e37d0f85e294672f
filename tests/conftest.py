"""Shared fixtures: the real default model (fetched once by the project's own fetcher) and tiny
random models built from configs that reuse its tokenizer and chat template."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread per xdist worker (the suite runs one worker per core), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    from optimizer.fetch import QWEN_CODER_05B, ensure_model_folder

    return ensure_model_folder(QWEN_CODER_05B)


# Tiny versions of the families we support; MoE and hybrid ones built by transformers' Auto classes.
FAMILY_OVERRIDES = {
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 48,
        "head_dim": 16,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    "qwen3_next": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "head_dim": 16,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
    "lfm2": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
}


def build_tiny_model(folder: Path, tokenizer_dir: Path, arch: str = "qwen2", **overrides) -> Path:
    """A random model with a few small layers and the real tokenizer, saved as a HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
    }
    common.update(FAMILY_OVERRIDES.get(arch, {}))
    common.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common))
    # random biases are zero-initialised; make them non-zero so that bias edits are exercised
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, qwen_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", qwen_dir)


@pytest.fixture(scope="session")
def tiny_varied_dir(tmp_path_factory, qwen_dir) -> Path:
    """Weights large enough that greedy answers change token by token: the default initialisation
    repeats one token forever, which would hide a decoding loop that feeds back a stale token."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-varied") / "model", qwen_dir, initializer_range=0.3)


@pytest.fixture(scope="session")
def tiny_varied_llama_dir(tmp_path_factory, qwen_dir) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-varied-llama") / "model", qwen_dir, "llama", initializer_range=0.3, attention_bias=True
    )


@pytest.fixture(scope="session")
def tiny_llama_bias_dir(tmp_path_factory, qwen_dir) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama") / "model", qwen_dir, "llama", attention_bias=True, mlp_bias=True
    )


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, qwen_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral") / "model", qwen_dir, "mistral")


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory, qwen_dir) -> Path:
    # soft-capped final logits (and attention): the manual LM head path must apply the cap too
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-gemma2") / "model",
        qwen_dir,
        "gemma2",
        head_dim=16,
        final_logit_softcapping=3.0,
    )


@pytest.fixture(scope="session")
def tiny_thinking_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny qwen2 model with a DeepSeek-R1/Qwen3-style template: its generation prompt opens a
    reasoning block ("<think>\\n"), or holds an empty closed one when enable_thinking is false."""
    folder = tmp_path_factory.mktemp("tiny-thinking") / "model"
    shutil.copytree(tiny_dir, folder)
    template = folder / "chat_template.jinja"
    plain = "{{- '<|im_start|>assistant\\n' }}"
    assert template.read_text().count(plain) == 1, "the qwen template's generation prompt changed"
    thinking = plain + (
        "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}"
        "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    )
    template.write_text(template.read_text().replace(plain, thinking))
    return folder


@pytest.fixture
def no_template_dir(tmp_path, tiny_dir) -> Path:
    """The tiny model with its chat template removed."""
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    return folder


def file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# -- PostgreSQL (the multi-worker and storage tests) -------------------------------------------------

PG_URL = os.environ.get("OPTIMIZER_TEST_PG_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="no PostgreSQL server: set OPTIMIZER_TEST_PG_URL (.ci/run starts one)")


@pytest.fixture
def pg_url():
    """A fresh database on the test server, dropped afterwards (with any connection left to it)."""
    import uuid

    import psycopg

    assert PG_URL
    name = f"optimizer_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
