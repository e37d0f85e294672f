"""Front-filling trials (`--front-fill`, optimizer/fill.py): the widest gap of the front, each way once,
filled by a front trial's edit scaled by s, which is the same edit s times as strong at every site."""

import json
import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

from optimizer.cli import main
from optimizer.components import COMPONENTS, Site
from optimizer.config import Settings
from optimizer.directions import compute_stats
from optimizer.fill import ATTR, Point, line_of, next_fill
from optimizer.params import build_plan, replay_params, scaled_params, suggest_params
from tests.test_directions import synthetic
from tests.test_study import STATS_METHODS


def test_the_widest_gap_is_filled_first_from_its_stronger_end_then_its_weaker_and_none_twice():
    baseline = Point(None, 0.9, 0.0)
    a, b, c, d = Point(1, 0.8, 0.01, 1), Point(2, 0.5, 0.05, 2), Point(3, 0.1, 0.2, 3), Point(4, 0.0, 0.9, 4)
    beyond = Point(5, 0.0, 1.2, 5)  # past --kl-limit: adds nothing to the hypervolume, no gap of its own
    # areas by hand: c-d 0.7 * 0.1 = 0.07, b-c 0.15 * 0.4 = 0.06, a-b 0.04 * 0.3 = 0.012, baseline-a 0.01 * 0.1 = 0.001
    expected = [
        (4, 3, 0.55),
        (3, 4, 0.55),
        (3, 2, 0.125),
        (2, 3, 0.125),
        (2, 1, 0.03),
        (1, 2, 0.03),
        (1, None, 0.005),  # the unedited model has no edit to scale up
    ]
    tried: set = set()
    front = [d, beyond, b, a, c]  # any order
    kls = {p.number: p.kl for p in front}
    for source, toward, target in expected:
        fill = next_fill(front, baseline, front, tried, kl_limit=1.0)
        assert fill is not None and (fill.source, fill.toward) == (source, toward)
        assert fill.target_kl == pytest.approx(target)
        assert fill.scale == pytest.approx(math.sqrt(target / kls[source]))  # KL ~ s^2 near the unedited model
        tried.add((fill.source, fill.toward))
    assert next_fill(front, baseline, front, tried, kl_limit=1.0) is None
    assert next_fill([], baseline, [], set(), kl_limit=1.0) is None


def test_a_way_with_a_trial_of_the_same_line_inside_the_gap_is_not_tried_again():
    baseline = Point(None, 0.9, 0.0)
    a, b = Point(1, 0.5, 0.1, line=1), Point(2, 0.1, 0.4, line=2)
    front = [a, b]
    # the widest gap is a-b (0.3 * 0.4); a weakened copy of b (line 2) already lies in it, dominated by a
    weakened_b = Point(7, 0.6, 0.25, line=2)
    fill = next_fill(front, baseline, [*front, weakened_b], set(), kl_limit=1.0)
    assert fill is not None and (fill.source, fill.toward, fill.line) == (1, 2, 1)  # a strengthened instead
    strengthened_a = Point(8, 0.55, 0.3, line=1)
    fill = next_fill(front, baseline, [*front, weakened_b, strengthened_a], set(), kl_limit=1.0)
    assert fill is not None and (fill.source, fill.toward) == (1, None)  # that gap is done: the next, baseline-a
    # a trial of another line, or of the same line outside the gap, leaves the way open
    elsewhere = [*front, Point(9, 0.6, 0.25, line=5), Point(10, 0.05, 0.5, line=2)]
    fill = next_fill(front, baseline, elsewhere, set(), kl_limit=1.0)
    assert fill is not None and (fill.source, fill.toward) == (2, 1)


def test_a_scaled_trial_is_the_same_edit_scaled_at_every_site_within_the_weight_range():
    harmful, harmless = synthetic(8, 20, 20, 16, seed=2)
    stats = compute_stats(harmful, harmless)
    settings = Settings(max_weight=1.5)  # the default methods, the fitted one included (a random direction here)
    fitted = torch.nn.functional.normalize(
        torch.randn(stats.mean_diff.shape[1], generator=torch.Generator().manual_seed(0)), dim=0
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    checked_subspace = False
    for _ in range(12):
        trial = study.ask()
        suggest_params(trial, stats.n_layers, settings)
        study.tell(trial, 0.0)
        source = trial.params
        scale = 0.6
        plan, _ = build_plan(replay_params(source, stats.n_layers, settings), stats, fitted=fitted)
        scaled, _ = build_plan(
            replay_params(scaled_params(source, scale, settings), stats.n_layers, settings), stats, fitted=fitted
        )
        for c in COMPONENTS:
            assert scaled.weights[c] == pytest.approx([w * scale for w in plan.weights[c]])
        assert scaled.decay == plan.decay and scaled.rank == plan.rank
        for c in COMPONENTS:
            for layer, w in enumerate(plan.weights[c]):
                site = Site(c, layer, torch.nn.Identity(), f"{c}.{layer}", "", [])
                edit, edited = plan.at(site), scaled.at(site)  # what a hook and an export apply
                assert edited.weights.tolist() == pytest.approx((edit.weights * scale).tolist())
                assert edited.basis.equal(edit.basis)
                checked_subspace |= plan.rank > 1 and w > 0
    assert checked_subspace
    # within the weight range: scaled up past --max-weight, a peak weight stops at it
    strong = {f"{c}_peak_weight": 1.2 for c in COMPONENTS}
    assert scaled_params(strong, 2.0, settings) == {f"{c}_peak_weight": 1.5 for c in COMPONENTS}


def _study(model, tmp_path, *extra):
    config = tmp_path / "markers.toml"
    config.write_text(f"refusal_markers = {json.dumps(['q', 'z', 'x'])}\n")
    args = [
        "run", "--model", str(model), "--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache"),
        "--study", "f", "--config", str(config), "--direction-prompts", "8", "--scoring-prompts", "16",
        "--max-new-tokens", "6", "--no-verify", "--no-seeded-starts", "--seed", "0", *STATS_METHODS, *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path}/studies/f.db")


def test_a_study_queues_a_fill_every_nth_trial_after_the_start_up_ones(tiny_varied_dir, tmp_path):
    study = _study(tiny_varied_dir, tmp_path, "--trials", "14", "--startup-trials", "6", "--front-fill", "2")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 14
    fills = [t for t in trials if ATTR in t.user_attrs]
    assert [t.number for t in fills] == [7, 9, 11, 13]  # every second trial from the seventh counted one on
    by_number = {t.number: t for t in trials}
    for fill in fills:
        record = fill.user_attrs[ATTR]
        source = by_number[record["from"]]
        assert source.number < fill.number and record["line"] == line_of(source)
        assert fill.params == pytest.approx(scaled_params(source.params, record["scale"], Settings()))
        kl = source.values[1] * record["scale"] ** 2  # where it is aimed
        assert record["target_kl"] == pytest.approx(kl, rel=1e-3)
        if record["scale"] < 1:  # weaker: less KL than its source, about s^2 times it (measured here: within 3%)
            assert fill.values[1] < source.values[1]
            assert fill.values[1] == pytest.approx(record["target_kl"], rel=0.25)
    off = tmp_path / "off"
    off.mkdir()
    plain = _study(tiny_varied_dir, off, "--trials", "10", "--startup-trials", "6")
    assert not any(ATTR in t.user_attrs for t in plain.trials)
