"""Export as a PEFT LoRA adapter: PEFT's own loader (and merge) on a freshly loaded base model gives the
hooked trial's logits; edits that LoRA cannot express are refused before anything is written."""

import copy
import dataclasses
import io
import json

import optuna
import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from optimizer.ablation import AblationHooks
from optimizer.cli import main
from optimizer.components import discover
from optimizer.errors import UserError
from optimizer.lora_export import _verify, lora_targets, write_lora
from optimizer.prompts import format_chat
from optimizer.residuals import tokenize
from optimizer.stored import open_study
from optimizer.trials import load_edited_model
from tests.conftest import build_tiny_model
from tests.test_families import PerExpertMoE
from tests.test_study import run_args

PROMPTS = ["Write a haiku about rain.", "How do I pick a lock?"]
# transformers 5 deprecation reached through PEFT's loader
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def study_of(tmp_path_factory):
    """A short finished study (3 trials: the baseline and two edited ones) on a model folder, made once per module."""
    made = {}

    def make(model_dir, *extra: str):
        key = (str(model_dir), extra)
        if key not in made:
            studies = tmp_path_factory.mktemp("lora-studies") / "studies"
            assert main(run_args(model_dir, studies, "--trials", "3", "--startup-trials", "3", "--seed", "5", *extra)) == 0
            made[key] = studies
        return made[key]

    return make


def edited_of(studies):
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    edited = [t for t in study.trials if not t.user_attrs.get("baseline") and t.state.name == "COMPLETE"]
    number = max(edited, key=lambda t: (t.params.get("subspace_k", 1), -t.number)).number  # the largest subspace, first
    stored = open_study("t", None, str(studies))
    return load_edited_model(stored, number, Console(file=io.StringIO()), device="cpu", dtype="float32", full_precision=True)


def batch(loaded):
    return tokenize(loaded, format_chat(loaded.tokenizer, PROMPTS))


def logits(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits.float()


def hooked_logits(edited, inputs) -> torch.Tensor:
    edited.prepared.hooks.apply(edited.plan)
    try:
        return logits(edited.prepared.loaded.model, inputs)
    finally:
        edited.prepared.hooks.clear()


def expected_modules(edited, mlp: tuple[str, ...] = ("mlp.down_proj",)) -> set[str]:
    """The modules of the layers whose weight is not 0, from the plan's weights."""
    leaves = {"attn": ("self_attn.o_proj",), "mlp": mlp}
    return {
        f"model.layers.{i}.{leaf}"
        for c, ws in edited.plan.weights.items()
        for i, w in enumerate(ws)
        if w != 0
        for leaf in leaves[c]
    }


@pytest.mark.parametrize("model_fixture,subspace_max", [("tiny_dir", 1), ("tiny_llama_bias_dir", 1), ("tiny_llama_bias_dir", 4)])
def test_adapter_on_fresh_base_equals_hooked_trial(model_fixture, subspace_max, request, study_of, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    edited = edited_of(study_of(model_dir, "--subspace-max", str(subspace_max)))
    rank = edited.plan.rank
    assert (rank == 1) if subspace_max == 1 else (rank > 1), "one trial of each kind: rank 1, and a refusal subspace"
    loaded = edited.prepared.loaded
    inputs = batch(loaded)
    original = logits(loaded.model, inputs)
    hooked = hooked_logits(edited, inputs)
    assert (hooked - original).abs().max() > 1e-3, "the trial must change the model"
    assert any(w == 0 for ws in edited.plan.weights.values() for w in ws), "a layer with weight 0 must be left out"

    out = tmp_path / "adapter"
    report = write_lora(edited, out, Console(file=io.StringIO()))
    assert not out.with_name("adapter.partial").exists()
    # the study's model is left as it was: modules, biases and hooks (cleared)
    assert torch.equal(logits(loaded.model, inputs), original)

    config = json.loads((out / "adapter_config.json").read_text())
    with_bias = model_fixture == "tiny_llama_bias_dir"
    assert config["base_model_name_or_path"] == str(model_dir) and config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (rank, rank, "lora_only" if with_bias else "none")
    assert set(config["target_modules"]) == expected_modules(edited)
    tensors = load_file(out / "adapter_model.safetensors")
    assert {t.shape[1] for k, t in tensors.items() if k.endswith("lora_B.weight")} == {rank}
    assert sum(k.endswith(".bias") for k in tensors) == (len(expected_modules(edited)) if with_bias else 0)
    assert report.modules == len(expected_modules(edited)) and report.biases == (report.modules if with_bias else 0)
    assert report.size_bytes == sum(f.stat().st_size for f in out.iterdir())
    full = (model_dir / "model.safetensors").stat().st_size
    assert report.size_bytes < full / 50, (report.size_bytes, full)
    assert report.max_abs_diff < 1e-4 and report.top1_agreement > 0.99
    record = json.loads((out / "optimizer.json").read_text())
    assert record["trial"] == edited.trial.number and record["study"] == "t" and record["weights"] == edited.plan.weights
    readme = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in readme and "merge_and_unload()" in readme and "--enable-lora" in readme

    # PEFT's loader onto a freshly loaded base model (plain transformers), then merged
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(logits(adapted, inputs), hooked, rtol=1e-4, atol=1e-4)
    merged = adapted.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, inputs), hooked, rtol=1e-4, atol=1e-4)


def test_per_expert_moe_adapter(tiny_dir, study_of, tmp_path):
    """MoE blocks with a ModuleList of experts: every expert's (and the shared expert's) down projection gets a pair."""
    edited = edited_of(study_of(tiny_dir))
    loaded = edited.prepared.loaded
    torch.manual_seed(0)
    for layer in loaded.layers:
        layer.mlp = PerExpertMoE(loaded.hidden_size, 32, 4)
    moe = dataclasses.replace(loaded, discovery=discover(loaded.model, loaded.layers, loaded.hidden_size))
    edited.prepared.hooks.remove()
    prepared = dataclasses.replace(
        edited.prepared, spec=dataclasses.replace(edited.prepared.spec, loaded=moe), hooks=AblationHooks(moe)
    )
    edited = dataclasses.replace(edited, prepared=prepared)
    base = copy.deepcopy(loaded.model)
    inputs = batch(loaded)
    hooked = hooked_logits(edited, inputs)
    assert (hooked - logits(base, inputs)).abs().max() > 1e-3

    report = write_lora(edited, tmp_path / "moe", Console(file=io.StringIO()))
    want = expected_modules(edited, mlp=(*(f"mlp.experts.{e}.down_proj" for e in range(4)), "mlp.shared_expert.down_proj"))
    config = json.loads((tmp_path / "moe" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == want and report.modules == len(want)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "moe"))
    torch.testing.assert_close(logits(adapted, inputs), hooked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(adapted.merge_and_unload(), inputs), hooked, rtol=1e-4, atol=1e-4)


def test_verification_catches_a_broken_adapter(tiny_llama_bias_dir, study_of, tmp_path):
    """The check that write_lora runs before reporting success fails on an adapter whose B has the wrong sign."""
    edited = edited_of(study_of(tiny_llama_bias_dir))
    out = tmp_path / "adapter"
    write_lora(edited, out, Console(file=io.StringIO()))
    path = out / "adapter_model.safetensors"
    tensors = {k: -t if k.endswith("lora_B.weight") else t for k, t in load_file(path).items()}
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=r"the LoRA adapter does not reproduce the hooked model .*--format hf"):
        _verify(edited, lora_targets(edited), out)


def assert_refused(edited, out, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        write_lora(edited, out, Console(file=io.StringIO()))
    assert not out.exists() and not out.with_name(out.name + ".partial").exists(), "nothing is written"


def test_refuses_norm_preserving_study(tiny_llama_bias_dir, study_of, tmp_path):
    edited = edited_of(study_of(tiny_llama_bias_dir, "--norm-preserving"))
    assert_refused(edited, tmp_path / "np", r"run with --norm-preserving.*not a low-rank update.*--format hf")


def test_refuses_fused_moe_experts(tmp_path, qwen_dir, study_of):
    edited = edited_of(study_of(build_tiny_model(tmp_path / "moe", qwen_dir, "qwen3_moe")))
    assert any(w != 0 for w in edited.plan.weights["mlp"])
    assert_refused(
        edited,
        tmp_path / "out",
        r"fused expert tensors \(model\.layers\.\d\.mlp\.experts\.down_proj, shape \(4, 64, 32\)\).*--format hf",
    )


def test_refuses_non_linear_projection(tiny_dir, study_of, tmp_path):
    """GPT-2-style Conv1D output projections: not an nn.Linear, refused."""
    edited = edited_of(study_of(tiny_dir))
    loaded = edited.prepared.loaded
    for layer in loaded.layers:
        layer.self_attn.o_proj = Conv1D(loaded.hidden_size, loaded.hidden_size)
    swapped = dataclasses.replace(loaded, discovery=discover(loaded.model, loaded.layers, loaded.hidden_size))
    edited = dataclasses.replace(
        edited, prepared=dataclasses.replace(edited.prepared, spec=dataclasses.replace(edited.prepared.spec, loaded=swapped))
    )
    assert_refused(
        edited, tmp_path / "out", r"self_attn\.o_proj\.weight \(Conv1D, shape \(64, 64\)\), which is not .*--format hf"
    )


def test_refuses_non_empty_out(tiny_dir, study_of, tmp_path):
    edited = edited_of(study_of(tiny_dir))
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty; choose a new --out folder"):
        write_lora(edited, out, Console(file=io.StringIO()))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not (tmp_path / "full.partial").exists()


def test_refuses_the_unedited_baseline(tiny_dir, study_of, tmp_path):
    stored = open_study("t", None, str(study_of(tiny_dir)))
    edited = load_edited_model(stored, 0, Console(file=io.StringIO()), device="cpu", dtype="float32", full_precision=True)
    assert_refused(edited, tmp_path / "out", r"trial 0 changes no weight .*pick an edited trial")


def test_export_command_writes_the_adapter_and_refuses_norm_preserving_before_loading(
    tiny_dir, tiny_llama_bias_dir, study_of, tmp_path, capsys
):
    studies = study_of(tiny_dir)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    edited = [t for t in study.trials if not t.user_attrs.get("baseline") and t.state.name == "COMPLETE"]
    number = max(edited, key=lambda t: (t.params.get("subspace_k", 1), -t.number)).number  # the largest subspace, first
    out = tmp_path / "adapter"
    args = ["export", "--study", "t", "--studies-dir", str(studies), "--trial", str(number), "--format", "lora"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().err
    assert "MiB against" in printed and "full --format hf export" in printed
    assert (out / "adapter_config.json").exists() and json.loads((out / "optimizer.json").read_text())["trial"] == number
    updated = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db").trials[number]
    assert updated.user_attrs["exported_to"] == str(out.resolve())

    norm = study_of(tiny_llama_bias_dir, "--norm-preserving")
    capsys.readouterr()  # the study's own output, when this test made it
    args = [
        "export",
        "--study",
        "t",
        "--studies-dir",
        str(norm),
        "--trial",
        "1",
        "--format",
        "lora",
        "--out",
        str(tmp_path / "np"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a low-rank update" in err and "--format hf" in err
    assert "Loading model" not in err and "Ablation sites" not in err  # refused before the model was loaded
    assert not (tmp_path / "np").exists()
