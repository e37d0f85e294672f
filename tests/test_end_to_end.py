"""End to end on the real Qwen2.5-Coder-0.5B-Instruct default model, with a handful of prompts."""

import optuna
import pytest

from optimizer.cli import main


@pytest.mark.real_model
def test_real_model_study(qwen_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    args = [
        "run", "--model", str(qwen_dir), "--studies-dir", str(studies), "--study", "e2e", "--trials", "2",
        "--direction-prompts", "16", "--scoring-prompts", "6", "--max-new-tokens", "6", "--seed", "1",
        "--verify-prompts", "3", "--verify-max-new-tokens", "16",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "baseline refusals" in err
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{studies}/e2e.db")
    baseline, trial = study.trials
    refused, total = map(int, baseline.user_attrs["refusals"].split("/"))
    assert total == 6 and refused >= 1, "the real model refuses some clearly harmful requests"
    assert trial.values[1] > 0  # an edit moves the first-token distribution
    responses = [s["response"] for s in baseline.user_attrs["sample_responses"]]
    assert any(r.strip() for r in responses)
    if trial in study.best_trials:  # the front was verified with long answers on held-out prompts
        assert "Verification: 16-token answers" in err
        assert trial.user_attrs["verify"]["n_harmful"] == 3
