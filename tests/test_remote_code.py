"""A model whose architecture ships as code with it: refused without --trust-remote-code, run and
exported with it (and the export says so)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimizer.cli import main
from tests.test_study import run_args

CONFIGURATION = """
from transformers import Qwen2Config


class RemoteTinyConfig(Qwen2Config):
    model_type = "{model_type}"
"""

MODELING = """
from transformers import Qwen2ForCausalLM

from .configuration_remote_tiny import RemoteTinyConfig


class RemoteTinyForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteTinyConfig
"""


@pytest.fixture
def remote_code_dir(tiny_dir, tmp_path) -> Path:
    """The tiny qwen2 model re-declared as a custom architecture whose classes live in the folder."""
    folder = tmp_path / "remote-tiny"
    shutil.copytree(tiny_dir, folder)
    model_type = f"remote_tiny_{uuid.uuid4().hex[:6]}"  # not registered with transformers by an earlier test
    (folder / "configuration_remote_tiny.py").write_text(CONFIGURATION.format(model_type=model_type))
    (folder / "modeling_remote_tiny.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type=model_type,
        architectures=["RemoteTinyForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote_tiny.RemoteTinyConfig",
            "AutoModelForCausalLM": "modeling_remote_tiny.RemoteTinyForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_needs_the_flag_and_the_export_says_so(remote_code_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    assert main(run_args(remote_code_dir, studies, "--trials", "2")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "ships its architecture as code" in err and "--trust-remote-code" in err
    assert not (studies / "t.db").exists()

    assert main(run_args(remote_code_dir, studies, "--trials", "2", "--trust-remote-code")) == 0
    assert "RemoteTinyForCausalLM" in capsys.readouterr().err  # the discovery table names the class
    out = tmp_path / "exported"
    assert main(["export", "--study", "t", "--studies-dir", str(studies), "--trial", "1", "--out", str(out)]) == 0
    assert json.loads((out / "optimizer.json").read_text())["trust_remote_code"] is True
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(reloaded).__name__ == "RemoteTinyForCausalLM"
