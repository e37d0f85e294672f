"""The fitted direction (optimizer/fitting.py): its loss against the trials' own hooks on full logits,
the fit lowering that loss, the search space and replay of the `fitted` method, and a study that
fits, caches, resumes and exports it."""

import dataclasses
import io
import json

import optuna
import pytest
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from rich.console import Console
from safetensors.torch import load_file

from optimizer import fitting
from optimizer.ablation import AblationPlan
from optimizer.cli import main
from optimizer.components import COMPONENTS
from optimizer.config import Settings
from optimizer.judges import MarkerJudge, normalise
from optimizer.model import load_model
from optimizer.packing import shared_prefix_length
from optimizer.params import Kernel, TrialParams, baseline_params, build_plan, replay_params, seeded_starts, suggest_params
from optimizer.prompts import format_chat
from optimizer.residuals import tokenize
from optimizer.scoring import generate_and_classify
from optimizer.stored import open_study
from optimizer.trials import load_edited_model
from optimizer.workbench import prepare, resolve
from tests.test_study import STATS_METHODS, run_args


@pytest.fixture(scope="module")
def bench(tiny_varied_dir, tmp_path_factory):
    s = Settings(
        model=str(tiny_varied_dir),
        study="f",
        studies_dir=str(tmp_path_factory.mktemp("fit") / "studies"),
        direction_prompts=8,
        scoring_prompts=4,
        max_new_tokens=4,
        device="cpu",
        dtype="float32",
        batch_size=4,
    )
    prepared = prepare(resolve(s, Console(file=io.StringIO())), s.cache_path())
    texts = prepared.spec.texts
    data = fitting.fit_data(
        prepared.loaded,
        prepared.hooks,
        fitting.start_plan(prepared.stats, fitting.TARGET_WEIGHT),
        (texts.direction_harmful, texts.direction_prompts[0]),
        texts.direction_harmless,
        MarkerJudge(s.refusal_markers, echo_aware=False),
        prepared.batch_size,
    )
    return prepared, data


def reference_loss(prepared, data: fitting.FitData, plan: AblationPlan) -> tuple[float, float]:
    """CE of the targets and first-token KL with `plan` applied by the trials' hooks, from full logits."""
    prepared.hooks.apply(plan)
    try:
        with torch.inference_mode():
            run = lambda ids, mask: (
                prepared.loaded.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            )
            logits = run(data.ids, data.mask)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), data.labels[:, 1:].flatten())  # mean over target tokens
            last = run(data.harmless_ids, data.harmless_mask)[:, -1].log_softmax(-1)
            kl = (data.base.exp() * (data.base - last)).sum(-1).mean()
    finally:
        prepared.hooks.clear()
    return float(ce), float(kl)


def shared(plan: AblationPlan, direction: torch.Tensor) -> AblationPlan:
    """`plan`'s weights with one unit direction at every layer."""
    n_layers = len(next(iter(plan.weights.values())))
    unit = F.normalize(direction, dim=0).expand(n_layers, -1)
    return AblationPlan({c: unit for c in plan.weights}, plan.weights)


def test_the_fit_loss_is_the_trial_edit_s_loss(bench):
    prepared, data = bench
    assert (data.labels != -100).any(dim=1).all()  # every row has target tokens, at its end
    plan = fitting.start_plan(prepared.stats, fitting.FIT_WEIGHT)
    assert min(plan.weights["attn"]) == pytest.approx(0.65) and max(plan.weights["attn"]) < 1.0  # every layer edited
    direction = torch.randn(prepared.stats.mean_diff.shape[1], generator=torch.Generator().manual_seed(0))
    hooks = fitting.SharedDirectionHooks(prepared.loaded, direction, plan.weights)
    try:
        ce, kl = fitting.fit_loss(prepared.loaded, data, prepared.batch_size, backward=False)
    finally:
        hooks.remove()
    want_ce, want_kl = reference_loss(prepared, data, shared(plan, direction))
    assert ce == pytest.approx(want_ce, rel=1e-4) and kl == pytest.approx(want_kl, rel=1e-3, abs=1e-6)
    assert kl > 1e-4  # the edit does something to check


def test_packed_rows_give_the_padded_loss_and_gradient(bench):
    """The fit's layout on CPUs (rows end to end behind their shared prefix) against padded batches,
    which the test above holds to the trials' own hooks: the same CE, KL and gradient of the direction."""
    prepared, data = bench
    loaded = prepared.loaded
    rows = [row[keep.bool()].tolist() for row, keep in zip(data.ids, data.mask)]
    assert shared_prefix_length(rows) > 0 and len(set(map(len, rows))) > 1  # a prefix to share, padding to spare
    plan = fitting.start_plan(prepared.stats, fitting.FIT_WEIGHT)
    v = torch.randn(prepared.stats.mean_diff.shape[1], generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    hooks = fitting.SharedDirectionHooks(loaded, v, plan.weights)
    got = {}
    try:
        for packed in (False, True):
            v.grad = None
            ce, kl = fitting.fit_loss(loaded, data, 3, backward=True, packed=packed)  # 3: several padded batches
            got[packed] = ce, kl, v.grad.clone()
    finally:
        hooks.remove()
        for p in trainable:
            p.requires_grad_(True)
    (ce, kl, grad), (packed_ce, packed_kl, packed_grad) = got[False], got[True]
    assert packed_ce == pytest.approx(ce, rel=1e-5) and packed_kl == pytest.approx(kl, rel=1e-4)
    assert kl > 1e-4 and grad.norm() > 0
    torch.testing.assert_close(packed_grad, grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))
    assert fitting.choose_layout(loaded, data, plan, 4)[0]  # chosen on the CPU for this model, after the check


def test_the_fit_keeps_padded_batches_where_a_layer_attends_otherwise(bench, tiny_gemma2_dir):
    """Gemma 2's sliding-window layers: a packed row would let one row see the next; padded batches,
    with the reason."""
    prepared, data = bench
    gemma = load_model(str(tiny_gemma2_dir), "cpu", "float32")
    packed, why = fitting.choose_layout(gemma, data, fitting.start_plan(prepared.stats, fitting.FIT_WEIGHT), 4)
    assert not packed and "full attention" in why  # decided before anything is forwarded


def test_the_fit_lowers_the_loss_and_leaves_the_model_alone(bench):
    prepared, data = bench
    model = prepared.loaded.model
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    grad_flags = [p.requires_grad for p in model.parameters()]
    plan = fitting.start_plan(prepared.stats, fitting.FIT_WEIGHT)
    start = fitting.peak_direction(plan)
    torch.testing.assert_close(fitting.fit_direction(prepared.loaded, data, plan, prepared.batch_size, steps=0), start)
    fitted = fitting.fit_direction(prepared.loaded, data, plan, prepared.batch_size, steps=6)
    assert fitted.norm() == pytest.approx(1.0) and float(fitted @ start) < 0.9999

    def loss(direction: torch.Tensor) -> float:
        ce, kl = reference_loss(prepared, data, shared(plan, direction))
        return ce + fitting.KL_WEIGHT * kl

    assert loss(fitted) < loss(start) - 1e-3
    assert [p.requires_grad for p in model.parameters()] == grad_flags
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_a_model_that_refuses_every_direction_prompt_under_the_start_edit_keeps_the_start_direction(bench):
    """No answer to fit towards: no data, and the method's direction is the start's, unfitted (a run
    with the default methods goes on). The judge: markers that every answer of the start edit
    contains (a character of each), so that each is judged a refusal."""
    prepared, _ = bench
    texts = prepared.spec.texts
    harmful = (texts.direction_harmful, texts.direction_prompts[0])
    start = fitting.start_plan(prepared.stats, fitting.TARGET_WEIGHT)
    nothing = MarkerJudge([], echo_aware=False)
    prepared.hooks.apply(start)
    try:
        answers = generate_and_classify(
            prepared.loaded, harmful[0], fitting.TARGET_TOKENS, nothing, 4, harmful[1], stop_early=False
        )
    finally:
        prepared.hooks.clear()
    every = MarkerJudge(sorted({normalise(a).strip()[:1] for a in answers.responses} - {""}), echo_aware=False)
    assert fitting.fit_data(prepared.loaded, prepared.hooks, start, harmful, texts.direction_harmless, every, 4) is None
    fit = fitting.fitted_direction(prepared.loaded, prepared.hooks, prepared.stats, harmful, texts.direction_harmless, every, 4)
    assert (fit.targets, fit.prompts) == (0, len(harmful[0]))
    expected = fitting.peak_direction(fitting.start_plan(prepared.stats, fitting.FIT_WEIGHT))
    torch.testing.assert_close(fit.direction, F.normalize(expected.float(), dim=0))
    answered = fitting.fitted_direction(
        prepared.loaded, prepared.hooks, prepared.stats, harmful, texts.direction_harmless, nothing, 4
    )
    assert answered.targets > 0 and float(answered.direction @ fit.direction) < 0.999  # fitted: moved from its start


def test_a_fitted_trial_ablates_the_fitted_direction_at_every_edited_layer(bench):
    prepared, _ = bench
    stats, fitted = prepared.stats, F.normalize(torch.randn(prepared.stats.mean_diff.shape[1]), dim=0)
    kernels = {c: Kernel(1.0, 2.0, 0.5, 1.0) for c in COMPONENTS}
    params = TrialParams("fitted", None, None, kernels)
    plan, info = build_plan(params, stats, projected=1.0, blended=True, fitted=fitted)  # neither projected nor blended
    assert info.fallback_layers == [] and plan.weights["attn"] == kernels["attn"].weights(stats.n_layers)
    for c in COMPONENTS:
        torch.testing.assert_close(plan.directions[c], fitted.expand(stats.n_layers, -1))
    with pytest.raises(ValueError, match="no fitted direction"):
        build_plan(params, stats)
    assert params.describe_direction() == "fitted, every layer"


def test_the_search_space_of_the_fitted_method():
    settings = Settings(direction_methods=["discriminant", "fitted"], searched_winsorize=0.995)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = suggest_params(trial, 8, settings)
        seen.add(params.method)
        if params.method == "fitted":  # one direction for every layer, as fitted: nothing else about it to choose
            assert (params.projection, params.clipped, params.direction_index, params.shrinkage) == (None,) * 4
            assert not {"projection", "clipped", "direction_scope", "direction_index", "shrinkage"} & set(trial.params)
        else:
            assert params.projection is not None and params.clipped is not None
        assert replay_params(trial.params, 8, settings) == params
        study.tell(trial, 0.0)
    assert seen == {"discriminant", "fitted"}
    flat = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):  # the GP sampler's flat space: every parameter drawn, the trial's the same
        trial = flat.ask()
        params = suggest_params(trial, 8, settings, flat=True)
        assert {"projection", "clipped", "direction_scope", "shrinkage"} <= set(trial.params)
        assert replay_params(trial.params, 8, settings) == params
        flat.tell(trial, 0.0)
    # the unedited model: a method of the statistics where there is one
    assert replay_params(baseline_params(8, settings), 8, settings).method == "discriminant"
    alone = dataclasses.replace(settings, direction_methods=["fitted"])
    base = baseline_params(8, alone)
    assert replay_params(base, 8, alone).method == "fitted" and not {"projection", "clipped", "direction_index"} & set(base)


def test_a_study_fits_caches_resumes_and_exports_the_fitted_direction(tiny_varied_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    args = run_args(tiny_varied_dir, studies, "--direction-methods", "discriminant,fitted", "--subspace-max", "1", seeded=True)
    assert main([*args, "--trials", "6"]) == 0
    err = capsys.readouterr().err
    assert (studies / "t" / "fitted_direction.safetensors").exists()  # beside the statistics
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    seeded = [t for t in study.trials if t.user_attrs.get("seeded") == "fitted"]
    assert len(seeded) == 1 and seeded[0].params["direction_method"] == "fitted"
    assert seeded[0].user_attrs["direction"] == "fitted, every layer"
    # fitted when its first trial asks for it: after the statistics' seeded starts (enqueued first)
    assert seeded[0].number == 5 and all(t.params["direction_method"] != "fitted" for t in study.trials[:5])
    assert err.index("trial 4:") < err.index("Fitted the direction in") < err.index("trial 5:")
    said = " ".join(err.split())  # the console wraps long lines
    assert "harmful direction prompts; rows packed without padding (vs padded batches" in said  # the CPU's layout, checked
    assert main([*args, "--trials", "9"]) == 0  # resumed: the fit is read back if a trial needs it, never redone
    err = capsys.readouterr().err
    resumed = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db").trials[6:]
    assert "Fitted the direction" not in err
    assert ("Reusing the cached fitted direction" in err) == any(t.params["direction_method"] == "fitted" for t in resumed)
    # a run without the method may not add to it: its fitted trials would mean another edit
    without = run_args(tiny_varied_dir, studies, "--direction-methods", "discriminant", "--subspace-max", "1", seeded=True)
    assert main([*without, "--trials", "8"]) == 2
    assert "fitted_direction" in capsys.readouterr().err

    number = seeded[0].number
    out = tmp_path / "exported"
    assert main(["export", "--study", "t", "--studies-dir", str(studies), "--trial", str(number), "--out", str(out)]) == 0
    edited = load_edited_model(open_study("t", None, str(studies)), number, Console(file=io.StringIO()))
    assert edited.prepared.fitted is not None
    fitted = edited.prepared.fitted.direction
    assert json.loads((out / "optimizer.json").read_text())["params"]["direction_method"] == "fitted"
    directions = load_file(out / "ablation.safetensors")
    for c in COMPONENTS:
        torch.testing.assert_close(directions[f"{c}.directions"], fitted.float().expand(edited.prepared.stats.n_layers, -1))
    loaded = edited.prepared.loaded
    texts = format_chat(loaded.tokenizer, ["Write a haiku about rain.", "How do I pick a lock?"])
    with torch.inference_mode():
        original = loaded.model(**tokenize(loaded, texts)).logits
        edited.prepared.hooks.apply(edited.plan)
        hooked = loaded.model(**tokenize(loaded, texts)).logits
        baked = load_model(str(out), "cpu", "float32").model(**tokenize(loaded, texts)).logits
    assert (hooked - original).abs().max() > 1e-3
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)
    # in another precision the study's own fitted direction is read back, not fitted again in that one
    log = io.StringIO()
    other = load_edited_model(open_study("t", None, str(studies)), number, Console(file=log), dtype="bfloat16")
    assert other.prepared.loaded.dtype == torch.bfloat16 and "Reusing the cached fitted direction" in log.getvalue()
    assert other.prepared.fitted is not None and torch.equal(other.prepared.fitted.direction.float(), fitted.float())


def test_the_seeded_start_of_the_fitted_method(bench):
    prepared, _ = bench
    stats = prepared.stats
    settings = Settings(direction_methods=["fitted"], subspace_max=1)
    starts = seeded_starts(stats, settings)
    assert set(starts) == {"fitted"}  # no start of the statistics' directions without one of their methods
    params = replay_params(starts["fitted"], stats.n_layers, settings)
    last = stats.n_layers - 1
    assert params.method == "fitted" and params.kernels["attn"] == Kernel(1.0, 0.5 * last, 0.3, max(1.0, 0.6 * last))


def test_a_run_with_the_default_methods_goes_on_when_there_is_nothing_to_fit_towards(tiny_dir, tmp_path, capsys):
    """The default methods include `fitted`; the default tiny model's answers (one token repeated) are
    all judged refusals, edited or not: the run says so, names how to leave the method out, and goes
    on with the start direction unfitted."""
    studies = tmp_path / "studies"
    args = [a for a in run_args(tiny_dir, studies, seeded=True) if a not in STATS_METHODS]
    assert "--direction-methods" not in args and "fitted" in Settings().direction_methods
    # the first trials are the statistics' seeded starts, which need no fit: none is done
    assert main([*args, "--trials", "3"]) == 0
    assert "fitted direction" not in capsys.readouterr().err
    assert not (studies / "t" / "fitted_direction.safetensors").exists()
    # the fitted seeded start (enqueued after the statistics' four) asks for it
    assert main([*args, "--trials", "6"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "The fitted direction is left unfitted" in err and "--direction-methods contrastive,discriminant" in err
    assert (studies / "t" / "fitted_direction.safetensors").exists()
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    assert study.trials[5].user_attrs["seeded"] == "fitted" and study.trials[5].state == TrialState.COMPLETE
