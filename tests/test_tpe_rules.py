"""Optuna 4's TPE rules in Optuna 5 (the adapter): --tpe-bandwidth scott against Optuna 4's formula and
Optuna 5's own estimator (everything but the numerical kernels' widths the same); --tpe-weights
hypervolume against hypervolume contributions worked out by hand; --tpe-kl-scale sqrt against a plain
sampler on square roots."""

import dataclasses
import math

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from optimizer.optuna_adapter import hypervolume_contributions, scott_sigma, use_hypervolume_weights, use_scott_bandwidth


def estimators(observations, space):
    plain = optuna.samplers.TPESampler(multivariate=True, group=True, seed=0)
    scott = optuna.samplers.TPESampler(multivariate=True, group=True, seed=0)
    use_scott_bandwidth(scott)
    made = [s._parzen_estimator_cls(observations, space, s._parzen_estimator_parameters) for s in (plain, scott)]
    return [dict(zip(space, m._mixture_distribution.distributions)) for m in made]


def test_scott_widths_follow_optuna_4s_rule_and_nothing_else_changes():
    space = {
        "w": FloatDistribution(0.0, 1.5),
        "lr": FloatDistribution(1e-3, 10.0, log=True),
        "k": IntDistribution(1, 4),
        "how": CategoricalDistribution(["a", "b"]),
    }
    observations = {
        "w": np.array([0.1, 0.11, 0.12, 1.4]),
        "lr": np.array([0.01, 0.02, 5.0, 1.0]),
        "k": np.array([1.0, 2.0, 2.0, 4.0]),
        "how": np.array([0.0, 1.0, 1.0, 0.0]),  # choice indices, as Optuna keeps them
    }
    plain, scott = estimators(observations, space)
    n, d = 4, len(space)
    bounds = {"w": (0.0, 1.5), "lr": (math.log(1e-3), math.log(10.0)), "k": (0.5, 4.5)}
    for name, (low, high) in bounds.items():
        expected = 0.2 * n ** (-1 / (d + 4)) * (high - low)  # Optuna 4.9's multivariate sigma, inside the clip here
        assert scott_sigma(n, d, low, high) == expected
        np.testing.assert_allclose(scott[name].sigma[:n], expected)
        # the prior kernel, the means and the bounds are Optuna 5's
        assert scott[name].sigma[-1] == plain[name].sigma[-1] == high - low
        np.testing.assert_array_equal(scott[name].mu, plain[name].mu)
        assert scott[name][2:] == plain[name][2:]
    # Optuna 5's neighbour widths differ: the lone observation and its neighbour get kernels as wide as
    # the gap between them (1.28), the two others the clip's floor (1.5 / 6); Optuna 4's one width
    np.testing.assert_allclose(plain["w"].sigma[:n], [0.25, 0.25, 1.28, 1.28])
    np.testing.assert_allclose(scott["w"].sigma[:n], 0.2 * 4 ** (-1 / 8) * 1.5)
    np.testing.assert_array_equal(scott["how"].weights, plain["how"].weights)


def test_scott_widths_are_clipped_as_optuna_clips_them():
    # many observations in few parameters: the rule would go below the magic clip's floor
    assert scott_sigma(10**9, 1, 0.0, 1.0) == 1.0 / 100.0
    assert scott_sigma(1, 1, 0.0, 2.0) == 2.0 / 3  # the rule's 0.4 is below range / (n + 2)
    assert scott_sigma(5, 12, 0.0, 2.0) == 0.2 * 5 ** (-1 / 16) * 2.0  # inside the clip


def test_a_study_samples_with_scott_widths():
    sampler = optuna.samplers.TPESampler(multivariate=True, group=True, n_startup_trials=5, seed=3)
    use_scott_bandwidth(sampler)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) ** 2, (1 - t.suggest_float("y", 0, 1)) ** 2), n_trials=12)
    assert len(study.trials) == 12 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_hypervolume_contributions_by_hand():
    points = [(0.1, 0.9), (0.5, 0.5), (0.9, 0.1), (0.6, 0.6), (0.5, 0.5)]
    # reference: the worst values times 1.1 = (0.99, 0.99); (0.6, 0.6) is dominated, the two (0.5, 0.5)
    # share their box, so neither has any of its own
    np.testing.assert_allclose(hypervolume_contributions(points), [0.4 * 0.09, 0, 0.09 * 0.4, 0, 0], atol=1e-12)
    np.testing.assert_allclose(hypervolume_contributions(points[:3]), [0.036, 0.16, 0.036], atol=1e-12)
    # shares among the front alone, as Optuna 4 took them: the dominated (0.6, 0.6) would cover part of
    # (0.5, 0.5)'s box if it were counted
    np.testing.assert_allclose(hypervolume_contributions(points[:4]), [0.036, 0.16, 0.036, 0], atol=1e-12)


def test_the_good_density_is_weighted_by_contribution_and_infeasible_trials_weigh_nothing():
    sampler = optuna.samplers.TPESampler(multivariate=True, group=True, seed=0)
    use_hypervolume_weights(sampler)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    space = {"x": FloatDistribution(0, 1)}
    values = [(0.1, 0.9), (0.5, 0.5), (0.9, 0.1), (0.6, 0.6), (0.2, 0.2)]

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        trial.set_constraint("c", 1.0 if trial.number == 4 else 0.0)  # the last one is infeasible: weighs nothing
        return values[trial.number]

    for i in range(len(values)):
        study.enqueue_trial({"x": i / 10})
    study.optimize(objective, n_trials=len(values))
    trials = study.get_trials(deepcopy=False)
    assert trials[4].constraints == {"c": 1.0}
    weights = sampler._build_parzen_estimator(study, space, trials, True)._mixture_distribution.weights
    share = np.array([0.036, 0.16, 0.036, 0.0, 0.0]) / 0.16
    expected = np.append(np.maximum(share, 1e-12), 1.0)  # and the prior's weight, 1
    np.testing.assert_allclose(weights, expected / expected.sum(), atol=1e-9)
    # a lone feasible trial weighs 1, as the whole front
    lone = sampler._build_parzen_estimator(study, space, trials[3:], True)._mixture_distribution.weights
    np.testing.assert_allclose(lone, np.array([1.0, 1e-12, 1.0]) / (2 + 1e-12), atol=1e-9)
    # the other density is Optuna's own: uniform
    other = sampler._build_parzen_estimator(study, space, trials, False)._mixture_distribution.weights
    np.testing.assert_allclose(other, np.full(6, 1 / 6))


def test_the_sqrt_kl_scale_samples_what_a_plain_sampler_samples_on_square_roots():
    """--tpe-kl-scale sqrt: the study's own sampler (`make_sampler`, with the default rules beside it)
    draws, trial after trial, what the same sampler without the rule draws from a copy of the study
    whose stored KLs are their square roots; and not what it draws from the study as it is, so the
    rule changes something. The stored values stay as they were."""
    from optimizer.config import Settings
    from optimizer.study import make_sampler

    # tiny at the low end, as KL is
    finished = finished_trials(40, lambda x, y, rng: (0.3 * y + 0.2 * x) ** 2 + 0.001 * rng.uniform())
    settings = Settings(startup_trials=10)
    scaled = study_of(make_sampler(dataclasses.replace(settings, tpe_kl_scale="sqrt"), seed=7), finished, same)
    reference = study_of(make_sampler(settings, seed=7), finished, math.sqrt)
    plain = study_of(make_sampler(settings, seed=7), finished, same)
    ours = draws(scaled, 4, same(0.04))  # on the front's knee: the next draws see it
    assert ours == draws(reference, 4, math.sqrt(0.04))
    assert ours != draws(plain, 4, same(0.04))
    assert [t.values[1] for t in scaled.trials] == [v[1] for _, v in finished] + [0.04] * 4


def same(kl):
    return kl


# The space of the sampler-view tests: two parameters, the refusal rate falling with y.
XY_SPACE = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 2)}


def finished_trials(n, kl_of):
    """`n` (params, (rate, KL)) trials at random points of XY_SPACE (seeded), KL = kl_of(x, y, rng)."""
    rng = np.random.default_rng(0)
    finished = []
    for _ in range(n):
        x, y = rng.uniform(0, 1), rng.uniform(0, 2)
        rate = float(np.clip(1 - y / 2 + 0.1 * rng.normal(), 0, 1))
        finished.append(({"x": x, "y": y}, [rate, float(kl_of(x, y, rng))]))
    return finished


def study_of(sampler, finished, stored_kl):
    """A two-objective study of the `finished` (params, (rate, KL)) trials, storing `stored_kl(KL)`."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for params, (rate, kl) in finished:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=XY_SPACE, values=[rate, stored_kl(kl)]))
    return study


def draws(study, n, told_kl):
    """The (x, y) of `n` trials the study's sampler draws, each told back at rate 0.3 and `told_kl`."""
    out = []
    for _ in range(n):
        trial = study.ask(XY_SPACE)
        out.append((trial.params["x"], trial.params["y"]))
        study.tell(trial, [0.3, told_kl])
    return out
