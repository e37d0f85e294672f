"""oneDNN-packed linear weights (CPU trials) against the plain modules, with the trial hooks on."""

import dataclasses
import io

import pytest
import torch
from rich.console import Console
from torch import nn

from optimizer import cpu_linear
from optimizer.ablation import AblationHooks
from optimizer.cpu_linear import PackedLinear, can_pack, pack_linear_layers, unpack_linear_layers
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat
from optimizer.scoring import generate_and_classify
from tests.test_ablation import PROMPTS, logits_of, random_plan

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("fixture", ["tiny_varied_dir", "tiny_llama_bias_dir"])
def test_packed_model_gives_the_plain_logits_and_answers(request, fixture):
    loaded = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    hooks = AblationHooks(loaded)
    hooks.apply(random_plan(loaded, seed=3))
    texts = format_chat(loaded.tokenizer, PROMPTS)
    plain_logits = logits_of(loaded)
    plain_answers = generate_and_classify(loaded, texts, 6, MarkerJudge([]), 2).responses
    state_keys = list(loaded.model.state_dict())
    linears = sum(type(m) is nn.Linear for m in loaded.model.modules())

    console = Console(file=io.StringIO())
    assert pack_linear_layers(loaded, console) == linears > 0
    assert sum(type(m) is PackedLinear for m in loaded.model.modules()) == linears
    assert list(loaded.model.state_dict()) == state_keys, "parameters keep their names (export reads them)"
    # the hooks registered before packing still edit the outputs
    torch.testing.assert_close(logits_of(loaded), plain_logits, rtol=1e-5, atol=1e-5)
    assert generate_and_classify(loaded, texts, 6, MarkerJudge([]), 2).responses == plain_answers
    hooks.clear()
    assert (logits_of(loaded) - plain_logits).abs().max() > 1e-3

    unpack_linear_layers(loaded.model)
    assert not any(isinstance(m, PackedLinear) for m in loaded.model.modules())
    hooks.apply(random_plan(loaded, seed=3))
    torch.testing.assert_close(logits_of(loaded), plain_logits, rtol=1e-5, atol=1e-5)


def test_packing_is_skipped_without_memory_or_off_cpu_float32(tiny_dir, monkeypatch):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 1024)
    out = io.StringIO()
    assert pack_linear_layers(loaded, Console(file=out, width=200)) == 0
    assert "Not packing the weights" in out.getvalue() and "GiB available" in out.getvalue()
    assert not any(isinstance(m, PackedLinear) for m in loaded.model.modules())
    monkeypatch.undo()
    loaded.model.to(torch.bfloat16)
    loaded = dataclasses.replace(loaded, dtype=torch.bfloat16)
    assert not can_pack(loaded) and pack_linear_layers(loaded, Console(file=io.StringIO())) == 0
