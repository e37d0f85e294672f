"""A model whose blocks a device map spreads over devices, against the same model on one device.

On this CPU every group of blocks is placed on "cpu", but through accelerate's `dispatch_model`
and its hooks (`load_model(device_map=...)`), the path a model spread over GPUs takes: residuals,
statistics, KL, greedy answers and export must equal the plain model's exactly (the same CPU
kernels run either way). With two GPUs the groups go to cuda:0 and cuda:1.
"""

import functools
import io
import types

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoConfig

import optimizer.workbench as workbench_module
from optimizer.ablation import AblationHooks
from optimizer.coherence import answer_nll
from optimizer.directions import compute_stats
from optimizer.errors import UserError
from optimizer.export import bake_and_verify
from optimizer.graph_decode import GraphDecoder
from optimizer.judges import MarkerJudge
from optimizer.model import empty_model, gpu_device_map, load_model
from optimizer.prompts import format_chat
from optimizer.residuals import collect_residuals, layer_residuals
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence
from optimizer.workbench import prepare, prepare_scoring, resolve
from tests.test_graph_decode import random_plan
from tests.test_study import short_settings

PROMPTS = [
    "Write a haiku about rain.",
    "How do I pick a lock?",
    "What is the capital of France?",
    "Tell me a joke.",
    "Explain, in two sentences, why the sky looks blue at noon and red at dusk.",
]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
DEVICES = [
    pytest.param(("cpu", "cpu", "cpu"), id="cpu-groups"),
    pytest.param(("cuda:0", "cuda:1"), id="two-gpus", marks=TWO_GPUS),
]


def groups(n_layers: int, devices: tuple[str, ...]) -> dict[str, str]:
    """A device map of a qwen2/llama-style model: consecutive blocks in one group per device, the
    embeddings (and the LM head tied to them) on the first."""
    placement = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "lm_head": devices[0]}
    for layer in range(n_layers):
        placement[f"model.layers.{layer}"] = devices[layer * len(devices) // n_layers]
    placement["model.norm"] = devices[-1]
    return placement


def same(got: torch.Tensor, want: torch.Tensor, devices: tuple[str, ...]) -> None:
    """Equal on the CPU (the same kernels on the same numbers); on two GPUs, within float32 rounding."""
    if devices[0] == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-6)


def load_split(folder, devices: tuple[str, ...]):
    loaded = load_model(str(folder), devices[0], "float32", device_map=groups(4, devices))
    assert loaded.split and all(hasattr(layer, "_hf_hook") for layer in loaded.layers)  # accelerate's hooks are in the path
    return loaded


@pytest.mark.parametrize("devices", DEVICES)
def test_a_split_model_gives_the_plain_models_statistics_kl_and_answers(tiny_varied_dir, devices):
    plain = load_model(str(tiny_varied_dir), devices[0], "float32")
    split = load_split(tiny_varied_dir, devices)
    assert split.device == torch.device(devices[0]) and not plain.split
    assert split.placement() == ("blocks 0-3 on cpu" if devices[0] == "cpu" else "blocks 0-1 on cuda:0, 2-3 on cuda:1")
    texts = format_chat(plain.tokenizer, PROMPTS)
    harmful, harmless = texts[:3], texts[2:]
    markers = MarkerJudge(["q", "z", "x"], echo_aware=False)  # decides some answers early: rows leave the batch
    results = {}
    for loaded in (plain, split):
        residuals = [layer_residuals(collect_residuals(loaded, part, 2), False) for part in (harmful, harmless)]
        assert all(r.device == loaded.device for r in residuals)
        stats = compute_stats(*residuals).tensors()
        baseline = first_token_logprobs(loaded, texts, 2)
        hooks = AblationHooks(loaded)
        hooks.apply(random_plan(loaded, seed=1))
        try:
            padded = first_token_logprobs(loaded, texts, 2)
            packed = first_token_logprobs(loaded, texts, 2, packed=True)
            answers = generate_and_classify(loaded, texts, 8, markers, batch_size=2)
            ids = [loaded.tokenizer(r, add_special_tokens=False)["input_ids"] for r in answers.responses]
            nll = answer_nll(loaded, texts, ids, batch_size=2)  # the coherence guard's
        finally:
            hooks.remove()
        results[loaded.split] = (stats, padded, packed, kl_divergence(baseline, padded), answers, nll)
    (stats, padded, packed, kl, answers, nll), (split_stats, *split_results) = results[False], results[True]
    for name, tensor in stats.items():
        same(split_stats[name], tensor, devices)
    same(split_results[0], padded, devices)
    same(split_results[1], packed, devices)
    assert kl > 0.01  # the plan changes the model
    assert split_results[2] == kl if devices[0] == "cpu" else abs(split_results[2] - kl) < 1e-6
    assert (split_results[3].responses, split_results[3].refused) == (answers.responses, answers.refused)
    assert 0 < answers.count < len(texts) and answers.tokens_generated < 8 * len(texts)
    same(torch.tensor(split_results[4]), torch.tensor(nll), devices)


@pytest.mark.parametrize("devices", DEVICES)
def test_a_split_model_exports_the_weights_of_the_plain_one(tiny_varied_dir, tmp_path, devices, monkeypatch):
    """Baked where each block lives: the saved weights equal the plain model's export, which gives
    the hooked model's logits (`bake_and_verify` checks that before anything is written)."""
    settings = short_settings(tiny_varied_dir, device=devices[0], dtype="float32", scoring_prompts=2)
    saved, identities = {}, {}
    for split in (False, True):
        if split:
            monkeypatch.setattr(workbench_module, "load_model", functools.partial(load_model, device_map=groups(4, devices)))
        prepared = prepare(resolve(settings, Console(file=io.StringIO())), tmp_path / f"cache-{split}")
        assert prepared.loaded.split == split
        identities[split] = prepared.spec.identity
        bake_and_verify(types.SimpleNamespace(prepared=prepared, plan=random_plan(prepared.loaded, seed=2)))
        prepared.loaded.model.save_pretrained(tmp_path / str(split))
        saved[split] = load_file(str(tmp_path / str(split) / "model.safetensors"))
    assert identities[True] == identities[False]  # the same study and cache, split or not
    assert saved[True].keys() == saved[False].keys()
    original = load_file(str(tiny_varied_dir / "model.safetensors"))
    edited = "model.layers.3.self_attn.o_proj.weight"
    assert (saved[True][edited].cpu() - original[edited]).abs().max() > 1e-3  # the plan was baked in
    for name, tensor in saved[False].items():
        same(saved[True][name], tensor, devices)


def test_a_split_model_decodes_eagerly_and_says_why(tiny_varied_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(workbench_module, "supports_graph_decoding", lambda loaded: True)  # as if on a GPU
    monkeypatch.setattr(workbench_module, "load_model", functools.partial(load_model, device_map=groups(4, ("cpu", "cpu"))))
    console = Console(file=io.StringIO(), width=200)
    settings = short_settings(tiny_varied_dir, max_new_tokens=3)
    scorer = prepare_scoring(resolve(settings, console), tmp_path)
    log = console.file.getvalue()
    assert (
        "Decoding eagerly: a CUDA graph is captured on one device, and the model is spread by a device map (blocks 0-3 on cpu)"
        in log
    )
    assert scorer.paths.graph is None and not scorer.hooks._static
    assert scorer.paths.packed_linears == 0 and "Packed" not in log  # accelerate's hooks would bypass a packed class
    assert scorer.score(random_plan(scorer.spec.loaded)).kl > 0
    with pytest.raises(ValueError, match="captured on one device"):
        GraphDecoder(scorer.spec.loaded, 2, 64, capture=False)


def test_a_model_larger_than_one_gpu_is_spread_in_whole_blocks(tmp_path):
    """The device map for several GPUs, from the model's size on the meta device (no GPU needed)."""
    config = AutoConfig.for_model(
        "qwen2", vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    model = empty_model(str(tmp_path), {})
    size = sum(p.numel() for p in model.parameters()) * 2  # bfloat16, the tied embeddings once
    assert gpu_device_map(model, torch.bfloat16, [2 * size, size]) is None  # fits on the first: one GPU
    placement = gpu_device_map(model, torch.bfloat16, [size // 2, size // 2, size // 2])
    assert placement is not None and set(placement.values()) == {0, 1, 2}
    blocks = [placement[f"model.layers.{i}"] for i in range(8)]  # every block whole, under its own name
    assert blocks == sorted(blocks) and placement["model.embed_tokens"] == placement["lm_head"] == 0
    assert placement["model.norm"] == 2 and all(not name.startswith("model.layers.0.") for name in placement)
    with pytest.raises(UserError, match=r"more than the 2 GPUs have free.*--quantization 4bit"):
        gpu_device_map(model, torch.bfloat16, [size // 3, size // 3])


def test_auto_spreads_a_model_larger_than_one_gpu_when_several_are_visible(tiny_varied_dir, monkeypatch):
    """`--device auto` with several GPUs: the map that `gpu_device_map` draws from the model on the meta
    device and each GPU's free memory places the model (here a map onto the CPU stands in for it)."""
    import optimizer.model as model_module

    asked = []

    def device_map(model, dtype, free):
        asked.append((next(model.parameters()).device.type, dtype, free))
        return groups(4, ("cpu", "cpu"))

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (10**9 + index, 2 * 10**9))
    monkeypatch.setattr(model_module, "gpu_device_map", device_map)
    console = Console(file=io.StringIO(), width=200)
    loaded = load_model(str(tiny_varied_dir), "auto", "float32", console=console)
    assert asked == [("meta", torch.float32, [10**9, 10**9 + 1])]
    assert loaded.split and all(hasattr(layer, "_hf_hook") for layer in loaded.layers)
    assert "by accelerate's device map: blocks 0-3 on cpu" in console.file.getvalue()
    asked.clear()
    assert not load_model(str(tiny_varied_dir), "cpu", "float32").split and not asked  # an explicit device: one device
