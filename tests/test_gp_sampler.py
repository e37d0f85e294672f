"""--sampler gp: Optuna's GP sampler sees KL capped at --kl-limit (checked against a plain GP sampler
on a copy of the study that stores the capped values), and the flat search space it needs samples every
parameter without changing what a trial means (checked against the replay, which reads only the used
ones); and a study run with it on the tiny model, resumed with TPE."""

import numpy as np
import optuna
import pytest

from optimizer.config import Settings
from optimizer.params import replay_params, suggest_params
from optimizer.study import make_sampler
from tests.test_tpe_rules import draws, finished_trials, same, study_of


def test_the_gp_sampler_samples_what_a_plain_one_samples_on_kl_capped_at_the_limit():
    """The study's own GP sampler (`make_sampler`) draws, trial after trial, what Optuna's GPSampler
    draws from a copy of the study whose stored KLs are capped at --kl-limit; and not what it draws
    from the study as it is (some KLs lie far past the limit), so the cap changes something. The
    stored values stay as they were."""
    # 0.02 to 20: broken edits far past the limit, as in a study
    finished = finished_trials(24, lambda x, y, rng: np.exp(3 * y + x - 4))
    settings = Settings(startup_trials=10, sampler="gp", kl_limit=1.0)

    def capped(kl):
        return min(kl, settings.kl_limit)

    ours_study = study_of(make_sampler(settings, seed=7), finished, same)
    reference = study_of(optuna.samplers.GPSampler(seed=7, n_startup_trials=10), finished, capped)
    plain = study_of(optuna.samplers.GPSampler(seed=7, n_startup_trials=10), finished, same)
    ours = draws(ours_study, 3, 2.5)  # past the limit: the capped copy is told 1
    assert ours == draws(reference, 3, capped(2.5))
    assert ours != draws(plain, 3, 2.5)
    assert [t.values[1] for t in ours_study.trials] == [v[1] for _, v in finished] + [2.5] * 3


@pytest.mark.parametrize(
    ("methods", "scopes"), [(["contrastive", "discriminant"], ["global", "per_layer"]), (["mean_diff"], ["per_layer"])]
)
def test_the_flat_space_samples_every_parameter_and_means_the_same_edit(methods, scopes):
    """Trials sampled flat hold every parameter of the space (the GP sampler's intersection is the
    whole space), their TrialParams leave the unused ones None exactly as the conditional space does,
    and the replay, which reads only the used parameters, gives the same TrialParams; the same
    stored parameters replayed without the unused ones too."""
    settings = Settings(direction_methods=methods, direction_scopes=scopes, sampler="gp")
    n_layers = 12
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    names: set[str] | None = None
    seen_unused = 0
    for _ in range(40):
        trial = study.ask()
        params = suggest_params(trial, n_layers, settings, flat=True)
        names = set(trial.params) if names is None else names
        assert set(trial.params) == names  # every trial the same parameters
        assert (params.gamma is None) == (params.k == 1)
        assert (params.alpha is None) == (params.method != "contrastive" and params.k == 1)
        assert (params.shrinkage is None) == (params.method != "discriminant")
        assert (params.direction_index is None) == (trial.params.get("direction_scope", scopes[0]) == "per_layer")
        assert replay_params(trial.params, n_layers, settings) == params
        used = {name: value for name, value in trial.params.items() if name in _used_names(params, trial.params)}
        assert replay_params(used, n_layers, settings) == params  # a trial the conditional space sampled
        seen_unused += len(trial.params) - len(used)
        study.tell(trial, [0.5, 0.1])
    assert {"subspace_gamma", "alpha"} <= names  # subspaces are searched (k up to 4), so alpha and gamma always
    assert ("shrinkage" in names) == ("discriminant" in methods)  # and no parameter no trial could use
    assert ("direction_index" in names) == ("global" in scopes)
    assert seen_unused > 0  # some trials carried parameters they did not use


def _used_names(params, stored):
    """The stored parameters a trial's TrialParams read."""
    unused = {
        "subspace_gamma": params.gamma is None,
        "alpha": params.alpha is None,
        "shrinkage": params.shrinkage is None,
        "direction_index": params.direction_index is None,
    }
    return [name for name in stored if not unused.get(name, False)]


def test_a_study_runs_with_the_gp_sampler_and_resumes_with_tpe(tiny_dir, tmp_path, capsys):
    """End to end on the tiny model: past its start-up trials the GP proposes every trial, each holding
    the whole flat space (the enqueued baseline's unused parameters drawn at random); the study then
    resumes with TPE, which samples the conditional space, and `show` reads both kinds and names the
    sampler the study was created with."""
    from optimizer.cli import main
    from tests.test_study import load, run_args

    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "5", "--sampler", "gp")) == 0
    trials = load(studies).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 5
    names = set(trials[0].params)
    assert {"subspace_gamma", "alpha", "shrinkage", "direction_index"} <= names
    assert all(set(t.params) == names for t in trials)
    assert main(run_args(tiny_dir, studies, "--trials", "7", "--sampler", "tpe")) == 0
    resumed = load(studies).trials[5:]
    assert [t.state for t in resumed] == [optuna.trial.TrialState.COMPLETE] * 2
    capsys.readouterr()
    assert main(["show", "--studies-dir", str(studies), "--study", "t"]) == 0
    assert "sampler='gp'" in capsys.readouterr().err  # the settings it was created with
