"""End to end on the real Qwen2.5-Coder-0.5B-Instruct default model, with a handful of prompts."""

import optuna
import pytest

from optimizer.cli import main
from tests.test_study import STATS_METHODS


@pytest.mark.real_model
def test_real_model_study(qwen_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    args = [
        "run",
        "--model",
        str(qwen_dir),
        "--studies-dir",
        str(studies),
        "--study",
        "e2e",
        "--trials",
        "2",
        "--direction-prompts",
        "16",
        "--scoring-prompts",
        "6",
        "--max-new-tokens",
        "6",
        "--seed",
        "1",
        "--verify-prompts",
        "3",
        "--verify-max-new-tokens",
        "16",
        *STATS_METHODS,  # the fitted direction's fit on this model would double the test's time
    ]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "baseline refusals" in err, err[-3000:]
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{studies}/e2e.db")
    baseline, trial = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # the seeded starts come first; the other three still wait
    assert trial.user_attrs.get("seeded") == "uniform", (trial.user_attrs, err[-3000:])
    assert [t.state.name for t in study.trials[2:]] == ["WAITING"] * 3, err[-3000:]
    refused, total = map(int, baseline.user_attrs["refusals"].split("/"))
    assert total == 6 and refused >= 1, ("the real model refuses some clearly harmful requests", err[-3000:])
    assert trial.values[1] > 0  # an edit moves the first-token distribution
    responses = [s["response"] for s in baseline.user_attrs["sample_responses"]]
    assert any(r.strip() for r in responses)
    if trial in study.best_trials:  # the front was verified with long answers on held-out prompts
        assert "Verification: 16-token answers" in err, err[-3000:]
        assert trial.user_attrs["verify"]["n_harmful"] == 3
