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
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    from optimizer.fetch import QWEN_CODER_05B, ensure_model_folder

    return ensure_model_folder(QWEN_CODER_05B)


def build_tiny_model(folder: Path, tokenizer_dir: Path, arch: str = "qwen2", **overrides) -> Path:
    """A random model with a few small layers and the real tokenizer, saved as a HF folder."""
    from transformers import (
        AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
        Qwen2Config, Qwen2ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    common.update(overrides)
    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM), "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common))
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
def tiny_llama_bias_dir(tmp_path_factory, qwen_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model", qwen_dir, "llama", attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, qwen_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral") / "model", qwen_dir, "mistral")


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory, qwen_dir) -> Path:
    # soft-capped final logits (and attention): the manual LM head path must apply the cap too
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-gemma2") / "model", qwen_dir, "gemma2", head_dim=16, final_logit_softcapping=3.0,
    )


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
