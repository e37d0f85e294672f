"""--tpe-bandwidth scott: the adapter's Parzen estimator against Optuna 4's formula and Optuna 5's own
estimator (everything but the numerical kernels' widths the same)."""

import math

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from optimizer.optuna_adapter import scott_sigma, use_scott_bandwidth


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
