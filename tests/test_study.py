"""A study on a tiny model: trials, resume to a total, cache reuse, recorded attributes."""

import warnings
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from optimizer.cli import main
from optimizer.config import Settings, build_settings
from optimizer.storage import counted_trials

# the statistics' methods only: a short study of the machinery, without the fitted direction's fit
# (tests/test_fitting.py runs that; the default methods include it)
STATS_METHOD_LIST = ["contrastive", "discriminant"]
STATS_METHODS = ("--direction-methods", ",".join(STATS_METHOD_LIST))


def short_settings(model: Path, **overrides) -> Settings:
    """A short study's settings for `workbench.resolve`: 4 + 4 prompts in batches of 4, the statistics'
    methods (no fit), no response-prefix detection; `overrides` replace or add settings."""
    settings = {"model": str(model), "direction_prompts": 4, "direction_methods": STATS_METHOD_LIST, "scoring_prompts": 4}
    return build_settings({**settings, "response_prefix": "", "batch_size": 4, **overrides})


def run_args(model: Path, studies: Path, *extra: str, seeded: bool = False) -> list[str]:
    """A short study's command line; without the seeded starts unless `seeded` (tests/test_starts.py);
    the statistics' methods unless `extra` names others."""
    return [
        "run",
        "--model",
        str(model),
        "--studies-dir",
        str(studies),
        "--study",
        "t",
        "--direction-prompts",
        "8",
        "--scoring-prompts",
        "4",
        "--max-new-tokens",
        "4",
        "--startup-trials",
        "2",
        "--no-verify",
        *([] if seeded else ["--no-seeded-starts"]),
        *STATS_METHODS,
        *extra,
    ]


def load(studies: Path) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")


def test_study_runs_resumes_to_total_and_reuses_cache(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "3")) == 0
    first = capsys.readouterr().err
    assert first.count("computing it now") == 2  # directions and baseline, once each
    study = load(studies)
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.metric_names == ["refusal_rate", "kl_divergence"]
    cache_files = {p.name: p.stat().st_mtime_ns for p in (studies / "t").glob("[!.]*")}
    assert set(cache_files) == {
        f"{entry}.{ext}" for entry in ("directions", "baseline", "batch_size") for ext in ("safetensors", "json")
    }
    assert "Batch size 8 (time per prompt by batch size: 8:" in first  # measured once: 4 prompts allow only 8
    assert ("linear weights for oneDNN" in first) == torch.backends.mkldnn.is_available()  # CPU trials

    assert main(run_args(tiny_dir, studies, "--trials", "5")) == 0
    second = capsys.readouterr().err
    assert "computing it now" not in second
    assert "Reusing cached direction statistics" in second and "Reusing cached baseline" in second
    assert "Batch size" not in second
    assert {p.name: p.stat().st_mtime_ns for p in (studies / "t").glob("[!.]*")} == cache_files
    study = load(studies)
    assert len(study.trials) == 5 and counted_trials(study) == 5

    # asking for fewer than the study holds runs nothing
    assert main(run_args(tiny_dir, studies, "--trials", "4")) == 0
    assert "nothing to run" in capsys.readouterr().err
    assert len(load(studies).trials) == 5


def test_trial_attributes_and_baseline(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "2", "--seed", "3")) == 0
    study = load(studies)
    baseline, trial = study.trials
    assert baseline.user_attrs["baseline"] is True
    assert baseline.values[1] == 0.0 and baseline.params["attn_peak_weight"] == 0.0
    assert study.user_attrs["baseline_refusals"] == baseline.user_attrs["refusals"]
    for key in ("refusals", "kl_divergence", "alpha", "direction", "timings", "sample_responses", "fallback_layers"):
        assert key in trial.user_attrs
    k, n = trial.user_attrs["refusals"].split("/")
    assert int(n) == 4 and trial.values[0] == int(k) / 4
    assert trial.values[1] == pytest.approx(trial.user_attrs["kl_divergence"], abs=1e-6)
    assert len(trial.user_attrs["sample_responses"]) == 3
    assert {"directions_s", "kl_s", "refusals_s", "total_s"} <= set(trial.user_attrs["timings"])
    assert "Pareto-optimal trials" in capsys.readouterr().err


def test_stale_running_trial_is_failed_and_not_counted(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "2")) == 0
    study = load(studies)
    study.ask()  # a trial left RUNNING, as by a process killed mid-trial
    assert main(run_args(tiny_dir, studies, "--trials", "3")) == 0
    assert "left RUNNING" in capsys.readouterr().err
    study = load(studies)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3
    assert counted_trials(study) == 3


def test_toml_config_and_cli_override(tiny_dir, tmp_path):
    studies = tmp_path / "studies"
    config = tmp_path / "run.toml"
    config.write_text(f'trials = 2\nscoring-prompts = 6\nmodel = "{tiny_dir}"\n')
    args = run_args(tiny_dir, studies, "--config", str(config))
    args.remove("--scoring-prompts"), args.remove("4")
    assert main(args) == 0
    study = load(studies)
    assert len(study.trials) == 2
    assert study.trials[1].user_attrs["refusals"].endswith("/6")


def test_front_crowding_an_upper_bound_is_reported_with_the_flag_that_widens_it():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from optimizer.report import bound_warnings

    weight, alpha = FloatDistribution(0.0, 1.5), FloatDistribution(0.0, 4.0)

    scope = CategoricalDistribution(["global", "per_layer"])  # no bounds: never warned about

    def trial(w: float, a: float, values: tuple[float, float], **attrs) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(
            params={"attn_peak_weight": w, "alpha": a, "direction_scope": "global"},
            distributions={"attn_peak_weight": weight, "alpha": alpha, "direction_scope": scope},
            values=list(values), user_attrs=attrs,
        )  # fmt: skip

    def study_of(*trials) -> optuna.Study:
        study = optuna.create_study(directions=["minimize", "minimize"])
        for t in trials:
            study.add_trial(t)
        return study

    crowded = study_of(
        trial(0.0, 0.0, (0.9, 0.0), baseline=True), trial(1.5, 1.0, (0.1, 0.3)), trial(1.49, 2.0, (0.2, 0.2)),
        trial(0.7, 3.0, (0.5, 0.1)), trial(1.5, 3.9, (0.95, 0.5)),  # the last is dominated: not on the front
    )  # fmt: skip
    (line,) = bound_warnings(crowded)
    assert "2 of 3 Pareto-optimal trials have attn_peak_weight at its upper bound 1.5" in line
    assert "--max-weight" in line and "(trials 1, 2)" in line
    # one trial at the bound is not a crowd; alpha near but not at 4.0 is not at its bound
    assert bound_warnings(study_of(trial(1.5, 3.5, (0.1, 0.3)), trial(0.7, 3.6, (0.2, 0.2)))) == []
    # a weight of 0 is no edit, not a bound a flag moves; a raised lower bound (--min-weight) is one
    assert bound_warnings(study_of(trial(0.0, 1.0, (0.1, 0.3)), trial(0.01, 2.0, (0.2, 0.2)))) == []
    weight = FloatDistribution(0.8, 1.5)
    (line,) = bound_warnings(study_of(trial(0.8, 1.0, (0.1, 0.3)), trial(0.81, 2.0, (0.2, 0.2)), trial(1.2, 2.0, (0.3, 0.1))))
    assert "2 of 3 Pareto-optimal trials have attn_peak_weight at its lower bound 0.8 (trials 0, 1)" in line
    assert "--min-weight 0.4" in line


def test_max_weight_sets_the_peak_weight_range(tiny_dir, tmp_path, capsys):
    from optimizer.config import build_settings
    from optimizer.params import replay_params

    settings = build_settings({"max_weight": 3.0})
    params = {
        "direction_scope": "per_layer",
        "direction_method": "discriminant",
        "shrinkage": 1.0,
        "projection": 0.0,
        "subspace_k": 1,
    }
    for c in ("attn", "mlp"):
        params.update({f"{c}_peak_weight": 2.5, f"{c}_peak_layer": 3.0, f"{c}_min_ratio": 0.5, f"{c}_falloff": 1.0})
    assert replay_params(params, 4, settings).kernels["attn"].peak_weight == 2.5
    studies = tmp_path / "s"
    assert main(run_args(tiny_dir, studies, "--max-weight", "0")) == 2
    assert "--max-weight must be positive" in capsys.readouterr().err
    assert main(run_args(tiny_dir, studies, "--subspace-max", "0")) == 2
    assert "--subspace-max must be between 1 and 16" in capsys.readouterr().err


def assert_refused(model: Path, studies: Path, capsys, flag: str, values: tuple[str, ...], message: str) -> None:
    """Each of `values` for `flag` stops the run with exit 2 and `message`, before any study is written."""
    for bad in values:
        assert main(run_args(model, studies, flag, bad)) == 2
        assert message in capsys.readouterr().err
    assert not studies.exists() or not list(studies.glob("*.db"))


def test_a_study_run_with_projected_directions_is_resumed_only_with_them(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "2", "--projected-directions")) == 0
    assert load(studies).user_attrs["run_settings"]["projected_directions"] is True
    capsys.readouterr()
    # without the flag the same parameters would be another edit: refused, and told the flag
    assert main(run_args(tiny_dir, studies, "--trials", "3")) == 2
    err = capsys.readouterr().err
    assert "was run with projected_directions=True" in err and "resume it with --projected-directions" in err
    assert len(load(studies).trials) == 2
    assert main(run_args(tiny_dir, studies, "--trials", "3", "--projected-directions")) == 0
    assert len(load(studies).trials) == 3


def test_kl_floor_is_checked_and_kept_by_a_resumed_study(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    # below 0; not below --kl-limit
    message = "--kl-floor must be at least 0 and below --kl-limit (1)"
    assert_refused(tiny_dir, studies, capsys, "--kl-floor", ("-0.01", "1.0"), message)
    assert main(run_args(tiny_dir, studies, "--trials", "2", "--kl-floor", "0.01")) == 0
    capsys.readouterr()
    assert main(run_args(tiny_dir, studies, "--trials", "3", "--kl-floor", "0.02")) == 2
    assert "was run with --kl-floor 0.01, which decides which of its trials count" in capsys.readouterr().err
    assert len(load(studies).trials) == 2
    assert main(run_args(tiny_dir, studies, "--trials", "3", "--kl-floor", "0.01")) == 0
    baseline, *_ = load(studies).trials
    # the unedited model: KL 0, below any floor; and refusing as often as itself (half a prompt over, of 4)
    assert baseline.constraints == {"kl_floor": 0.01, "refuses_less": 0.5 / 4}


def test_min_weight_narrows_every_sampled_peak_weight_and_keeps_the_unedited_baseline(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    # below 0; not below --max-weight
    message = "--min-weight must be at least 0 and below --max-weight (1.5)"
    assert_refused(tiny_dir, studies, capsys, "--min-weight", ("-0.1", "1.5"), message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the baseline's weight 0, below the range, must not warn
        assert main(run_args(tiny_dir, studies, "--trials", "5", "--seed", "1", "--min-weight", "0.8")) == 0
    baseline, *trials = load(studies).trials
    assert baseline.params["attn_peak_weight"] == 0.0 and baseline.values[1] == 0.0
    assert len(trials) == 4  # 2 random start-up trials, then TPE with the baseline in its history
    for t in trials:
        for c in ("attn", "mlp"):
            assert t.distributions[f"{c}_peak_weight"].low == 0.8
            assert 0.8 <= t.params[f"{c}_peak_weight"] <= 1.5
