"""GGUF export: a Hugging Face model converted (qwen2, llama with biases), a GGUF model edited in a copy of its
file, refusals. The tiny models use a cut-down copy of the real Qwen tokenizer (2,000 tokens plus its added
tokens): transformers' GGUF loader parses a 151k-token vocabulary in Python, which would take most of a minute
per load."""

from __future__ import annotations

import io
import json
from pathlib import Path

import gguf
import numpy as np
import optuna
import pytest
import torch
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from optimizer import gguf_export
from optimizer.cli import main
from optimizer.errors import UserError
from optimizer.export import bake_and_verify
from optimizer.gguf_export import TOLERANCE, _gguf_name, write_gguf, write_hf_model_as_gguf
from optimizer.model import locate
from optimizer.prompts import format_chat
from optimizer.stored import open_study
from optimizer.trials import load_edited_model
from tests.conftest import build_tiny_model
from tests.test_study import run_args

PROMPTS = ["Write a haiku about rain.", "How do I pick a lock?", "Explain recursion to a child in two sentences."]


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory, qwen_dir) -> Path:
    """The real Qwen tokenizer with its vocabulary cut to the first 2,000 tokens (the bytes and the most common
    merges) and its added tokens renumbered after them; pre-tokenizer and chat template unchanged."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    full = AutoTokenizer.from_pretrained(qwen_dir)
    data = json.loads(full.backend_tokenizer.to_str())
    keep = 2000
    vocab = {token: i for token, i in data["model"]["vocab"].items() if i < keep}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    for n, added in enumerate(data["added_tokens"]):
        added["id"] = keep + n
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = full.chat_template
    folder = tmp_path_factory.mktemp("small-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def tiny(tmp_path_factory, tokenizer_dir: Path, arch: str, **overrides) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp(f"gguf-{arch}") / "model", tokenizer_dir, arch, **overrides)


def finished_study(model: Path, studies: Path, trials: int = 3) -> int:
    """Run a short study on `model`; the number of its first finished edited trial."""
    assert main(run_args(model, studies, "--trials", str(trials), "--startup-trials", str(trials), "--seed", "5")) == 0
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    return next(t.number for t in study.trials if not t.user_attrs.get("baseline") and t.state.name == "COMPLETE")


def edited_model(studies: Path, number: int, baked: bool = True):
    edited = load_edited_model(
        open_study("t", None, str(studies)),
        number,
        Console(file=io.StringIO()),
        device="cpu",
        dtype="float32",
        full_precision=True,
    )
    if baked:
        bake_and_verify(edited)
    return edited


@torch.inference_mode()
def hooked_and_original_logits(studies: Path, number: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Last-position logits of the study's hooked model and of the unedited one, one prompt at a time."""
    edited = edited_model(studies, number, baked=False)
    loaded = edited.prepared.loaded
    texts = format_chat(loaded.tokenizer, PROMPTS)
    original = last_logits(loaded.model, loaded.tokenizer, texts)
    edited.prepared.hooks.apply(edited.plan)
    hooked = last_logits(loaded.model, loaded.tokenizer, texts)
    edited.prepared.hooks.remove()
    return hooked, original, texts


@torch.inference_mode()
def last_logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        rows.append(model(input_ids=ids).logits[0, -1].float())
    return torch.stack(rows)


def gguf_logits(path: Path, texts: list[str], **flags) -> torch.Tensor:
    """The file as transformers' GGUF loader reads it (dequantised, float32), with its own tokenizer; `flags` are
    config values that loader does not read from a GGUF (llama's attention_bias and mlp_bias)."""
    location, kwargs, model_kwargs = locate(str(path))
    config = AutoConfig.from_pretrained(location, **kwargs)
    for key, value in flags.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=torch.float32, **kwargs, **model_kwargs)
    return last_logits(model.eval(), AutoTokenizer.from_pretrained(location, **kwargs), texts)


def fields_bytes(reader: gguf.GGUFReader) -> dict[str, bytes]:
    """Every metadata field as the bytes stored in the file (key, type and value)."""
    return {key: b"".join(np.asarray(part).tobytes() for part in field.parts) for key, field in reader.fields.items()}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_folder_round_trip_gives_the_hooked_model(arch, small_tokenizer_dir, tmp_path_factory, tmp_path):
    # llama with biases everywhere: q/k weights and biases permuted for llama.cpp, o_proj/down_proj biases edited
    overrides = {"attention_bias": True, "mlp_bias": True} if arch == "llama" else {}
    studies = tmp_path / "studies"
    number = finished_study(tiny(tmp_path_factory, small_tokenizer_dir, arch, **overrides), studies)
    hooked, original, texts = hooked_and_original_logits(studies, number)
    assert (hooked - original).abs().max() > 1e-3, "the trial must change the model"
    scale = max(1.0, float(hooked.abs().max()))

    out = tmp_path / "out" / "model-f16.gguf"
    report = write_gguf(edited_model(studies, number), out, None, Console(file=io.StringIO()))
    assert report.path == out and report.size_bytes == out.stat().st_size and report.source == "hf"
    assert report.gguf_type == "f16" and report.tensor_types["F16"] == 4 * 7 + 1  # 7 matrices a block, embeddings
    assert report.max_abs_diff <= report.tolerance and report.top1_agreement == 1.0 and report.prompts == 6
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left beside it
    logits = gguf_logits(out, texts, **overrides)
    torch.testing.assert_close(logits, hooked, rtol=0, atol=TOLERANCE[gguf.GGMLQuantizationType.F16] * scale)

    exact = tmp_path / "out" / "model-f32.gguf"
    report = write_gguf(edited_model(studies, number), exact, "f32", Console(file=io.StringIO()))
    assert report.tensor_types == {"F32": len(gguf.GGUFReader(exact).tensors)}
    # float32 throughout: only summation order may differ
    torch.testing.assert_close(gguf_logits(exact, texts, **overrides), hooked, rtol=1e-4, atol=1e-4)

    reader = gguf.GGUFReader(exact)
    fields = {key: reader.fields[key].contents() for key in reader.fields if not key.startswith("GGUF.")}
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 4
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(small_tokenizer_dir).chat_template
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings, as llama.cpp writes them


def test_gguf_study_export_reencodes_only_the_edited_tensors(small_tokenizer_dir, tmp_path_factory, tmp_path):
    hf = tiny(tmp_path_factory, small_tokenizer_dir, "qwen2")
    source = tmp_path / "tiny.gguf"
    write_hf_model_as_gguf(
        AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), AutoTokenizer.from_pretrained(hf), source, "q8_0"
    )
    studies = tmp_path / "studies"
    number = finished_study(source, studies)
    hooked, original, texts = hooked_and_original_logits(studies, number)
    assert (hooked - original).abs().max() > 1e-3, "the trial must change the model"

    edited = edited_model(studies, number)
    changed = {
        f"blk.{site.layer}.{'attn_output' if site.component == 'attn' else 'ffn_down'}.weight"
        for site in edited.prepared.loaded.discovery.present()
        if edited.plan.weight_at(site) != 0
    }
    out = tmp_path / "edited.gguf"
    report = write_gguf(edited, out, "same", Console(file=io.StringIO()))
    assert report.source == "gguf" and report.gguf_type == "same: Q8_0" and report.notes == ()
    assert report.tensor_types == {"Q8_0": len(changed)} and report.max_abs_diff <= report.tolerance

    before, after = gguf.GGUFReader(source), gguf.GGUFReader(out)
    assert fields_bytes(after) == fields_bytes(before)  # tokenizer, chat template, hyperparameters: every byte
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
    for old, new in zip(before.tensors, after.tensors):
        assert new.tensor_type == old.tensor_type, new.name
        if new.name in changed:
            assert not np.array_equal(new.data, old.data), new.name
        else:
            assert new.data.tobytes() == old.data.tobytes(), new.name
    assert report.copied_tensors == len(before.tensors) - len(changed)
    # the edited Q8_0 tensors were quantised once more: the q8_0 tolerance
    scale = max(1.0, float(hooked.abs().max()))
    torch.testing.assert_close(gguf_logits(out, texts), hooked, rtol=0, atol=TOLERANCE[gguf.GGMLQuantizationType.Q8_0] * scale)


def test_unsupported_architecture_is_refused(small_tokenizer_dir, tmp_path_factory, tmp_path):
    model = tiny(tmp_path_factory, small_tokenizer_dir, "gemma2", head_dim=16)
    studies = tmp_path / "studies"
    number = finished_study(model, studies, trials=2)
    out = tmp_path / "out" / "gemma.gguf"
    with pytest.raises(UserError, match="converts llama and qwen2 models.*not 'gemma2'.*--format hf.*convert_hf_to_gguf.py"):
        write_gguf(edited_model(studies, number), out, None, Console(file=io.StringIO()))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_existing_out_bad_type_and_failed_check_leave_nothing(small_tokenizer_dir, tmp_path_factory, tmp_path, monkeypatch):
    studies = tmp_path / "studies"
    number = finished_study(tiny(tmp_path_factory, small_tokenizer_dir, "qwen2"), studies, trials=2)
    edited = edited_model(studies, number)
    out = tmp_path / "model.gguf"
    out.write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        write_gguf(edited, out, None, Console(file=io.StringIO()))
    assert out.read_text() == "keep me"
    with pytest.raises(UserError, match="--gguf-type must be one of f32, f16, bf16, q8_0, same"):
        write_gguf(edited, tmp_path / "new.gguf", "q4_k", Console(file=io.StringIO()))
    # a file that fails the check (here: no rounding allowed at all) is written, checked, and removed
    monkeypatch.setitem(gguf_export.TOLERANCE, gguf.GGMLQuantizationType.F16, 0.0)
    with pytest.raises(UserError, match="does not reproduce the edited model.*nothing was written"):
        write_gguf(edited, tmp_path / "new.gguf", "f16", Console(file=io.StringIO()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "studies"]


@pytest.mark.parametrize(
    ("arch", "path", "name"),
    [
        (gguf.MODEL_ARCH.QWEN2, "model.layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight"),
        (gguf.MODEL_ARCH.LLAMA, "model.layers.0.mlp.down_proj.bias", "blk.0.ffn_down.bias"),
        (gguf.MODEL_ARCH.QWEN3MOE, "model.layers.1.mlp.experts.down_proj", "blk.1.ffn_down_exps.weight"),
        (gguf.MODEL_ARCH.QWEN2MOE, "model.layers.2.mlp.shared_expert.down_proj.weight", "blk.2.ffn_down_shexp.weight"),
    ],
)
def test_edited_tensors_are_named_by_gguf_py_tensor_map(arch, path, name):
    assert _gguf_name(gguf.get_tensor_name_map(arch, 4), path) == name


def test_llama3_rope_factors_are_the_divisors_of_transformers_frequencies():
    """llama.cpp divides each rotary frequency by its `rope_freqs` entry; transformers applies llama 3 scaling to
    the frequencies themselves: the two must agree (the GGUF check cannot see this, its loader ignores both)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from optimizer.gguf_export import _llama3_rope_factors, _rope_parameters

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope["original_max_position_embeddings"] = 8192
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = torch.from_numpy(_llama3_rope_factors(_rope_parameters(config), 64))
    torch.testing.assert_close(factors, plain / scaled)
    assert factors[0] == 1.0 and factors[-1] == 32.0  # high frequencies kept, low ones divided by the factor


def test_export_command_writes_the_gguf_its_record_and_notes_it_on_the_trial(small_tokenizer_dir, tmp_path_factory, tmp_path):
    studies = tmp_path / "studies"
    number = finished_study(tiny(tmp_path_factory, small_tokenizer_dir, "qwen2"), studies)
    out = tmp_path / "model.gguf"
    args = [
        "export",
        "--study",
        "t",
        "--studies-dir",
        str(studies),
        "--trial",
        str(number),
        "--format",
        "gguf",
        "--out",
        str(out),
    ]
    assert main([*args, "--gguf-type", "q8_0"]) == 0
    record = json.loads(Path(f"{out}.optimizer.json").read_text())
    assert record["trial"] == number and record["format"] == "gguf" and record["gguf_type"] == "q8_0"
    assert record["check"]["max_abs_logit_diff"] <= record["check"]["tolerance"]
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2}
    assert types == {"Q8_0"}
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    assert study.trials[number].user_attrs["exported_to"] == str(out.resolve())
    assert main(args) == 2  # the file exists now: refused, left as it is
    assert json.loads(Path(f"{out}.optimizer.json").read_text()) == record
