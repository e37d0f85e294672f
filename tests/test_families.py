"""Every family we support, on tiny random models: discovery by structure, hooked trials equal to
exported weights, MoE experts (fused 3-D tensors, per-expert modules, shared experts), hybrid
attention, and the loading fallbacks."""

import copy
import dataclasses

import pytest
import torch
from rich.console import Console
from torch import nn
from transformers import AutoModelForCausalLM

from optimizer.ablation import AblationHooks, AblationPlan, bake_into_weights
from optimizer.components import discover
from optimizer.errors import UserError
from optimizer.model import load_model
from tests.conftest import build_tiny_model
from tests.test_ablation import logits_of, random_plan, random_subspace_plan

SAVED_FAMILIES = ["qwen3_moe", "mixtral", "granitemoe", "qwen2_moe", "gpt_oss", "qwen3_next", "lfm2"]


@pytest.fixture(scope="module")
def build_family(tmp_path_factory, qwen_dir):
    built = {}

    def build(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(arch) / "model", qwen_dir, arch)
        return built[arch]

    return build


@pytest.fixture(params=SAVED_FAMILIES)
def family_dir(request, build_family):
    return build_family(request.param)


# tiny_thinking_dir: a chat template whose generation prompt opens a reasoning block
DENSE_FIXTURES = ["tiny_dir", "tiny_llama_bias_dir", "tiny_mistral_dir", "tiny_gemma2_dir", "tiny_thinking_dir"]


@pytest.fixture(params=DENSE_FIXTURES + SAVED_FAMILIES)
def any_family_dir(request, build_family):
    if request.param in DENSE_FIXTURES:
        return request.getfixturevalue(request.param)
    return build_family(request.param)


def hooked_and_baked(loaded, plan, norm_preserving: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the model with the plan's hooks and of a copy with the plan baked into its weights."""
    baked = copy.deepcopy(loaded)
    bake_into_weights(baked, plan, norm_preserving)
    hooks = AblationHooks(loaded, norm_preserving)
    hooks.apply(plan)
    hooked = logits_of(loaded)
    hooks.remove()
    return hooked, logits_of(baked)


def table_text(loaded) -> str:
    return "\n".join(" | ".join(row) for row in loaded.discovery.table_rows())


def test_exported_weights_equal_hooked_trial(any_family_dir, tmp_path):
    """Bake a random plan, save and reload the folder: the logits equal the hooked model's."""
    loaded = load_model(str(any_family_dir), "cpu", "float32")
    plan = random_plan(loaded, seed=3)
    unedited = logits_of(loaded)
    hooks = AblationHooks(loaded)
    hooks.apply(plan)
    hooked = logits_of(loaded)
    hooks.remove()
    assert (hooked - unedited).abs().max() > 1e-3, "the plan must change the logits"
    bake_into_weights(loaded, plan)
    loaded.model.save_pretrained(tmp_path / "out")
    reloaded = dataclasses.replace(
        loaded, model=AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    )
    torch.testing.assert_close(logits_of(reloaded), hooked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["tiny_llama_bias_dir", "qwen3_moe"])
def test_exported_subspace_weights_equal_hooked_trial(family, request, build_family, tmp_path):
    """A refusal subspace (k = 3) baked, saved and reloaded: the hooked model's logits, fused experts included."""
    folder = request.getfixturevalue(family) if family in DENSE_FIXTURES else build_family(family)
    loaded = load_model(str(folder), "cpu", "float32")
    plan = random_subspace_plan(loaded, k=3, gamma=0.7, seed=8)
    hooked, _ = hooked_and_baked(loaded, plan)
    bake_into_weights(loaded, plan)
    loaded.model.save_pretrained(tmp_path / "out")
    reloaded = dataclasses.replace(
        loaded, model=AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    )
    torch.testing.assert_close(logits_of(reloaded), hooked, rtol=1e-4, atol=1e-4)


def test_discovery_lists_every_expert_and_hybrid_layer(family_dir):
    loaded = load_model(str(family_dir), "cpu", "float32")
    text = table_text(loaded)
    config = loaded.model.config
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        mlp = list(loaded.discovery.present("mlp"))
        assert len(mlp) == loaded.n_layers
        for site in mlp:
            block = getattr(loaded.layers[site.layer], "block_sparse_moe", None) or loaded.layers[site.layer].mlp
            assert site.module is block, "MoE sites hook the whole block's output"
            fused = [e for e in site.edits if e.tensor.dim() == 3]
            assert len(fused) == 1 and fused[0].tensor.shape[0] == experts
        assert f"({experts}, " in text and "fused experts" in text
        if getattr(config, "shared_expert_intermediate_size", None):
            assert all(any("shared_expert.down_proj" in e.path for e in s.edits) for s in mlp)
            assert "shared expert" in text
    types = getattr(config, "layer_types", None) or []
    if "linear_attention" in types or "conv" in types:
        modules = {s.path.split(".")[-2] for s in loaded.discovery.present("attn")}
        assert len(modules) == 2, f"hybrid layers: both kinds of mixer found, got {modules}"
    assert len(list(loaded.discovery.present("attn"))) == loaded.n_layers


def test_fused_expert_projection_changes_the_mlp_output(tmp_path, qwen_dir):
    loaded = load_model(str(build_tiny_model(tmp_path / "moe", qwen_dir, "qwen3_moe")), "cpu", "float32")
    block = loaded.layers[1].mlp
    x = torch.randn(1, 5, loaded.hidden_size)
    before = block(x)
    before = before[0] if isinstance(before, tuple) else before
    r = torch.nn.functional.normalize(before[0, 0], dim=0)  # the first token's whole output
    plan = AblationPlan(
        {c: r.expand(loaded.n_layers, -1) for c in ("attn", "mlp")},
        {"attn": [0.0] * loaded.n_layers, "mlp": [0.0, 1.0, 0.0, 0.0]},
    )
    hooks = AblationHooks(loaded)
    hooks.apply(plan)
    after = block(x)
    after = after[0] if isinstance(after, tuple) else after
    scale = before.norm()
    assert (after - before).norm() > 0.1 * scale and (after[0, 0]).norm() < 1e-5 * scale, "the first token's output is removed"
    assert (after @ r).abs().max() < 1e-5 * scale, "weight 1 removes the direction from every token's block output"
    hooks.remove()
    # baking into the fused 3-D expert tensors gives the same block output
    bake_into_weights(loaded, plan)
    baked = block(x)
    torch.testing.assert_close(baked[0] if isinstance(baked, tuple) else baked, after, rtol=1e-5, atol=1e-5)


class ExpertMLP(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            nn.Linear(d, inner, bias=False),
            nn.Linear(d, inner, bias=False),
            nn.Linear(inner, d),
        )

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class PerExpertMoE(nn.Module):
    """The layout of remote-code MoE models: a router and a ModuleList of expert MLPs (top-2)."""

    def __init__(self, d: int, inner: int, n: int):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(d, inner) for _ in range(n))
        self.shared_expert = ExpertMLP(d, inner)

    def forward(self, x):
        weights = self.gate(x).softmax(-1)
        top = weights.topk(2, dim=-1)
        chosen = torch.zeros_like(weights).scatter(-1, top.indices, top.values)
        outputs = torch.stack([e(x) for e in self.experts], dim=-2)
        return (chosen.unsqueeze(-1) * outputs).sum(-2) + self.shared_expert(x)


def test_per_expert_moe(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    torch.manual_seed(0)
    for layer in loaded.layers:
        layer.mlp = PerExpertMoE(loaded.hidden_size, 32, 4)
    loaded = dataclasses.replace(loaded, discovery=discover(loaded.model, loaded.layers, loaded.hidden_size))
    text = table_text(loaded)
    assert "experts.N.down_proj.weight (64, 32) x4" in text and "experts.N.down_proj.bias (64,) x4" in text, text
    assert "4 expert modules and the shared expert" in text
    hooked, baked = hooked_and_baked(loaded, random_plan(loaded, seed=4))
    assert (logits_of(loaded) - hooked).abs().max() > 1e-3
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)


class Opaque(nn.Module):
    """An MLP whose output projection has an unknown name."""

    def __init__(self, d: int):
        super().__init__()
        self.squeeze = nn.Linear(d, d)

    def forward(self, x):
        return self.squeeze(x)


def test_missing_component_stops_unless_allowed(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    loaded.layers[2].mlp = Opaque(loaded.hidden_size)
    with pytest.raises(
        UserError,
        match=r"could not find the mlp output in block 2 \(Qwen2DecoderLayer: .*mlp \(Opaque\).*--allow-missing-components",
    ):
        discover(loaded.model, loaded.layers, loaded.hidden_size)
    loaded = dataclasses.replace(loaded, discovery=discover(loaded.model, loaded.layers, loaded.hidden_size, allow_missing=True))
    assert loaded.discovery.missing("mlp") == [2] and loaded.discovery.missing("attn") == []
    assert ("mlp", "2", "not found", "skipped (--allow-missing-components)") in loaded.discovery.table_rows()
    hooked, baked = hooked_and_baked(loaded, random_plan(loaded, seed=5))
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)


def test_norm_preserving_hook_is_exact_and_keeps_row_norms(tiny_llama_bias_dir):
    loaded = load_model(str(tiny_llama_bias_dir), "cpu", "float32")
    plan = random_plan(loaded, seed=6)
    baked = copy.deepcopy(loaded)
    bake_into_weights(baked, plan, norm_preserving=True)
    for original, edited in zip(loaded.discovery.present(), baked.discovery.present()):
        if plan.weight_at(original) == 0:
            continue
        before, after = original.edits[0].rows(), edited.edits[0].rows()  # (in, d): what each input writes
        torch.testing.assert_close(after.norm(dim=-1), before.norm(dim=-1), rtol=1e-5, atol=1e-6)
        r = plan.at(original).basis[0]
        assert not torch.allclose(after, before)
        assert (after @ r).abs().mean() < (before @ r).abs().mean()
    hooked, baked_logits = hooked_and_baked(loaded, plan, norm_preserving=True)
    torch.testing.assert_close(baked_logits, hooked, rtol=1e-4, atol=1e-4)
    subspace = random_subspace_plan(loaded, k=3, gamma=0.8, seed=6)
    hooked, baked_logits = hooked_and_baked(loaded, subspace, norm_preserving=True)
    torch.testing.assert_close(baked_logits, hooked, rtol=1e-4, atol=1e-4)
    baked = copy.deepcopy(loaded)
    bake_into_weights(baked, subspace, norm_preserving=True)
    for original, edited in zip(loaded.discovery.present(), baked.discovery.present()):
        before, after = original.edits[0].rows(), edited.edits[0].rows()
        torch.testing.assert_close(after.norm(dim=-1), before.norm(dim=-1), rtol=1e-5, atol=1e-6)
    plain_hooked, _ = hooked_and_baked(loaded, plan)  # the norm-preserving edit differs from the plain one
    assert (plain_hooked - hooked).abs().max() > 1e-3


def test_norm_preserving_refuses_moe(family_dir):
    loaded = load_model(str(family_dir), "cpu", "float32")
    if all(site.is_single_projection for site in loaded.discovery.present()):
        pytest.skip("dense family")
    with pytest.raises(UserError, match="--norm-preserving needs dense output projections"):
        AblationHooks(loaded, norm_preserving=True)


def test_dtype_falls_back_when_logits_overflow(tmp_path, tiny_dir):
    """A checkpoint whose activations overflow float16 is loaded again in a wider dtype."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        # embeddings beyond float16's range (65504); RMSNorm makes them harmless in wider dtypes
        embeddings = model.get_input_embeddings().weight
        embeddings.copy_(torch.randn_like(embeddings) * 1e5)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(torch.randn_like(embeddings) * 0.02)
    folder = tmp_path / "overflow"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_dir / name).exists():
            (folder / name).write_bytes((tiny_dir / name).read_bytes())
    console = Console(record=True, width=200)
    loaded = load_model(str(folder), "cpu", "float16", console=console)
    assert loaded.dtype in (torch.bfloat16, torch.float32)
    assert "float16 gives NaN/inf logits on a test prompt; loading the model again in" in console.export_text()
    assert loaded.model.dtype == loaded.dtype


def test_four_bit_needs_cuda(tiny_dir):
    with pytest.raises(UserError, match="--quantization 4bit needs a CUDA GPU"):
        load_model(str(tiny_dir), "cpu", "float32", quantization="4bit")


def test_multimodal_checkpoint_ablates_the_text_decoder(tmp_path, qwen_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    config = AutoConfig.for_model(
        "gemma3",
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 5,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
    )
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path / "vlm")
    tokenizer.save_pretrained(tmp_path / "vlm")
    loaded = load_model(str(tmp_path / "vlm"), "cpu", "float32")
    assert loaded.n_layers == 3, "the text decoder's blocks, not the (longer) vision tower's"
    assert all("language_model" in site.path for site in loaded.discovery.present())
    hooked, baked = hooked_and_baked(loaded, random_plan(loaded, seed=7))
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)


def test_searched_winsorize_builds_each_trial_from_the_statistics_it_chose(tiny_llama_bias_dir, tmp_path, capsys):
    """--searched-winsorize Q: trials choose `clipped`; the two sets of statistics equal those a study
    without clipping and one with --winsorize Q compute, and a trial's exported directions are those
    built from the set it chose (and differ from the other's)."""
    import json

    from safetensors.torch import load_file

    from optimizer.cli import main
    from optimizer.config import settings_from_record
    from optimizer.directions import ContrastiveStats
    from optimizer.params import plan_for, replay_params
    from tests.test_study import load, run_args

    searched, plain, fixed = tmp_path / "searched", tmp_path / "plain", tmp_path / "fixed"
    assert main(run_args(tiny_llama_bias_dir, searched, "--trials", "8", "--searched-winsorize", "0.9")) == 0
    assert "(residuals clipped at the 0.9 quantile)" in capsys.readouterr().err
    assert main(run_args(tiny_llama_bias_dir, plain, "--trials", "1")) == 0
    assert main(run_args(tiny_llama_bias_dir, fixed, "--trials", "1", "--winsorize", "0.9")) == 0
    capsys.readouterr()
    by_set = {}
    for name, reference in (("directions", plain), ("clipped_directions", fixed)):
        ours, theirs = load_file(searched / "t" / f"{name}.safetensors"), load_file(reference / "t" / "directions.safetensors")
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
        by_set[name] = ContrastiveStats.from_tensors(ours)
    study = load(searched)
    edited = [t for t in study.trials if not t.user_attrs.get("baseline")]
    assert {t.params["clipped"] for t in edited} == {False, True}
    settings = settings_from_record(study.user_attrs["run_settings"], study="t", studies_dir=str(searched))
    for clipped in (False, True):
        trial = next(t for t in edited if t.params["clipped"] is clipped and t.params["attn_peak_weight"] > 0)
        out = tmp_path / f"export-{clipped}"
        export = ["export", "--study", "t", "--studies-dir", str(searched), "--trial", str(trial.number), "--out", str(out)]
        assert main(export) == 0
        assert "logits of the exported weights vs the hooked model: max |diff|" in capsys.readouterr().err
        assert json.loads((out / "optimizer.json").read_text())["winsorize"] == (0.9 if clipped else 0.0)
        exported = load_file(out / "ablation.safetensors")["attn.directions"]
        params = replay_params(trial.params, 4, settings)
        names = ("clipped_directions", "directions") if clipped else ("directions", "clipped_directions")
        chosen, other = (by_set[n] for n in names)
        torch.testing.assert_close(exported, plan_for(params, chosen, settings)[0].directions["attn"].float())
        assert (exported - plan_for(params, other, settings)[0].directions["attn"].float()).abs().max() > 1e-3
    # resumed with another quantile: other statistics, refused, and the fix names the flag and its value
    assert main(run_args(tiny_llama_bias_dir, searched, "--trials", "9", "--searched-winsorize", "0.95")) == 2
    err = capsys.readouterr().err
    assert "(searched_winsorize differ)" in err and "resume it with --searched-winsorize 0.9" in err, err[-2000:]


def test_study_with_variants_records_them_and_exports_exactly(tiny_llama_bias_dir, tmp_path, capsys):
    import json

    import optuna

    from optimizer.cli import main
    from tests.test_study import run_args

    studies = tmp_path / "studies"
    variants = ["--projected-directions", "--norm-preserving", "--winsorize", "0.99"]
    assert main(run_args(tiny_llama_bias_dir, studies, "--trials", "3", *variants)) == 0
    out = capsys.readouterr().err
    assert "Ablation sites in LlamaForCausalLM (4 blocks)" in out and "self_attn.o_proj: weight (64, 64), bias (64,)" in out
    # the load is announced by a line (logs time it), before the sites found in the loaded model
    assert out.index(f"Loading model {tiny_llama_bias_dir} on cpu float32") < out.index("Ablation sites")
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    assert {k: study.user_attrs["run_settings"][k] for k in ("projected_directions", "norm_preserving", "winsorize")} == {
        "projected_directions": True,
        "norm_preserving": True,
        "winsorize": 0.99,
    }
    # the same parameters would edit the model differently without the variant: refused
    assert main(run_args(tiny_llama_bias_dir, studies, "--trials", "4", "--projected-directions", "--winsorize", "0.99")) == 2
    err = capsys.readouterr().err
    assert "was run with norm_preserving=True" in err and "resume it with --norm-preserving" in err
    # other direction statistics (residuals not winsorized): not comparable; the fix names the flag and its value
    assert main(run_args(tiny_llama_bias_dir, studies, "--trials", "4", "--projected-directions", "--norm-preserving")) == 2
    err = capsys.readouterr().err
    assert "(winsorize differ)" in err and "resume it with --winsorize 0.99" in err, err[-2000:]
    # a study made before the projection was searched (its record without the setting) resumed with it on: refused
    # too, since its trials' parameters hold no projection to replay
    old_record = {k: v for k, v in study.user_attrs["run_settings"].items() if k != "searched_projection"}
    study.set_user_attr("run_settings", old_record)
    assert main(run_args(tiny_llama_bias_dir, studies, "--trials", "4", *variants)) == 2
    assert "resume it with --no-searched-projection" in capsys.readouterr().err
    study.set_user_attr("run_settings", {**old_record, "searched_projection": True})
    edited = next(t.number for t in study.trials if not t.user_attrs.get("baseline"))
    target = tmp_path / "exported"
    assert main(["export", "--study", "t", "--studies-dir", str(studies), "--trial", str(edited), "--out", str(target)]) == 0
    printed = capsys.readouterr().err
    assert "logits of the exported weights vs the hooked model: max |diff|" in printed and "GiB of RAM" in printed
    record = json.loads((target / "optimizer.json").read_text())
    assert record["norm_preserving"] is True and record["projected_directions"] is True
    assert any(row[0] == "mlp" and "down_proj" in row[2] for row in record["sites"])
