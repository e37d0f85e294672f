"""Early stop of trials that cannot reach the Pareto front (optimizer/front.py): the rule against a
brute-force domination check, the cut generation against the full one, and a study's front with and
without the stop on the same list of parameter sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optimizer.cli import main
from optimizer.front import Front
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat, load_prompts
from optimizer.scoring import generate_and_classify
from tests.test_study import STATS_METHODS


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def test_the_settling_count_is_where_domination_starts():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        kls = [rng.choice([0.0, 0.1, 0.2, 0.3]) + rng.choice([0.0, 0.05]) for _ in range(rng.randint(0, 6))]
        points = tuple((rng.randint(0, n), kl) for kl in kls)
        kl = rng.choice([0.0, 0.1, 0.15, 0.25, 0.3, 0.5])
        settle = Front(points).refusals_that_settle(kl)
        for count in range(n + 1):
            # a trial whose count so far is `count` is dominated whatever its later answers are
            certain = all(any(dominates(p, (final, kl)) for p in points) for final in range(count, n + 1))
            assert certain == (settle is not None and count >= settle), (points, kl, count, settle)
    assert Front.of([(0.25, 0.1), (0.5, 0.0)], 8).points == ((2, 0.1), (4, 0.0))


@pytest.fixture(scope="module")
def varied(tiny_varied_dir):
    loaded = load_model(str(tiny_varied_dir), device="cpu", dtype="float32")
    texts = format_chat(loaded.tokenizer, load_prompts(None, "harmful")[:12])
    return loaded, texts


def test_generation_given_up_keeps_a_lower_bound_and_the_same_answers(varied):
    loaded, texts = varied
    markers = ["q", "z", "x"]
    full = generate_and_classify(loaded, texts, 8, MarkerJudge(markers, echo_aware=False), batch_size=5)
    assert full.complete and 2 <= full.count < len(texts)  # the markers decide some answers, not all
    first = frozenset(i for i, refused in enumerate(full.refused) if refused)
    for threshold in range(1, full.count + 1):
        settled = lambda found, threshold=threshold: found >= threshold
        cut = generate_and_classify(
            loaded, texts, 8, MarkerJudge(markers, echo_aware=False), batch_size=5, first=first, give_up=settled
        )
        assert not cut.complete and threshold <= cut.count <= full.count
        assert cut.tokens_generated < full.tokens_generated
        for refused, answer, full_answer, full_refused in zip(cut.refused, cut.responses, full.responses, full.refused):
            assert full_answer.startswith(answer) and (full_refused or not refused)
    never = generate_and_classify(
        loaded,
        texts,
        8,
        MarkerJudge(markers, echo_aware=False),
        batch_size=5,
        first=first,
        give_up=lambda found: found > full.count,
    )
    assert never.complete and never.refused == full.refused and never.responses == full.responses


def _study(model: Path, tmp_path: Path, name: str, trials: int, *extra: str) -> optuna.Study:
    config = tmp_path / "markers.toml"
    config.write_text(f"refusal_markers = {json.dumps(['q', 'z', 'x'])}\n")
    args = [
        "run", "--model", str(model), "--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache"),
        "--study", name, "--config", str(config), "--direction-prompts", "8", "--scoring-prompts", "16",
        "--max-new-tokens", "6", "--trials", str(trials), "--no-verify", "--no-seeded-starts", *STATS_METHODS, *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/studies/{name}.db")


def _replay(model: Path, tmp_path: Path, name: str, reference: optuna.Study, *extra: str) -> optuna.Study:
    """A new study scoring the reference's parameter sets, in the same order."""
    study = _study(model, tmp_path, name, 1, *extra)  # created, with its baseline trial
    for trial in reference.trials[1:]:
        study.enqueue_trial(trial.params)
    return _study(model, tmp_path, name, len(reference.trials), *extra)


def test_the_front_is_the_same_with_and_without_the_stop(tiny_varied_dir, tmp_path, capsys):
    reference = _study(tiny_varied_dir, tmp_path, "full", 16, "--no-early-stop")
    assert "Early stop" not in capsys.readouterr().err
    # stopped by domination alone here (a KL limit above every trial's): --kl-limit's stop is checked below
    above_all = str(2 * max(t.values[1] for t in reference.trials) + 1.0)
    stopped = _replay(tiny_varied_dir, tmp_path, "stopped", reference, "--kl-limit", above_all)
    assert "Early stop:" in capsys.readouterr().err
    assert [t.params for t in stopped.trials] == [t.params for t in reference.trials]
    assert all(t.state == TrialState.COMPLETE for t in stopped.trials)

    front = lambda study: [(t.number, t.values) for t in sorted(study.best_trials, key=lambda t: t.number)]
    assert len(front(reference)) >= 2 and front(stopped) == front(reference)
    dominated = [t for t in stopped.trials if t.user_attrs.get("early_stop") == "dominated"]
    assert dominated, "no trial was stopped: the test would show nothing"
    for t in stopped.trials:
        truth = reference.trials[t.number]
        assert t.values[1] == pytest.approx(truth.values[1], abs=1e-6)
        if t in dominated:
            assert t.values[0] <= truth.values[0] and t.user_attrs["refusals"].startswith(">=")
            assert any(dominates(tuple(f.values), tuple(t.values)) for f in stopped.trials if f.number < t.number)
        else:
            assert t.values[0] == truth.values[0]

    # past --kl-limit: not generated, recorded as refusing everything; the front inside the limit is unchanged
    limit = sorted(t.values[1] for t in reference.trials)[-4]
    capped = _replay(tiny_varied_dir, tmp_path, "capped", reference, "--kl-limit", str(limit))
    above = {t.number for t in reference.trials if t.values[1] > limit}
    assert {t.number for t in capped.trials if t.user_attrs.get("early_stop") == "kl_limit"} == above
    assert all(capped.trials[n].values[0] == 1.0 for n in above)
    assert front(capped) == [(n, values) for n, values in front(reference) if values[1] <= limit]

    # refusing as often as the unedited model (the baseline itself included): infeasible (Optuna's constraint),
    # so off the front and among the sampler's bad trials; the front is the Pareto set of the other trials
    pareto = lambda trials: sorted(
        t.number for t in trials if not any(dominates(tuple(o.values), tuple(t.values)) for o in trials)
    )
    baseline = reference.trials[0]
    assert baseline.user_attrs["baseline"] and baseline.values[1] == 0.0
    assert all((t.constraints["refuses_less"] > 0) == (t.values[0] >= baseline.values[0]) for t in reference.trials)
    refusing_less = [t for t in reference.trials if t.values[0] < baseline.values[0]]
    assert 2 <= len(refusing_less) < len(reference.trials) - 1  # some edits are infeasible besides the baseline
    assert [n for n, _ in front(reference)] == pareto(refusing_less)

    # below --kl-floor: infeasible too, kept off the front, and never settling another trial's place; the front is
    # then the Pareto set of the trials at or above the floor that refuse less than the baseline
    front_kls = sorted({t.values[1] for t in reference.best_trials})
    assert len(front_kls) >= 2
    floor = (front_kls[0] + front_kls[1]) / 2  # between two front trials, far from any tie
    floored = _replay(tiny_varied_dir, tmp_path, "floored", reference, "--kl-floor", str(floor))
    assert all((t.constraints["kl_floor"] > 0) == (reference.trials[t.number].values[1] < floor) for t in floored.trials)
    assert [n for n, _ in front(floored)] == pareto([t for t in refusing_less if t.values[1] >= floor])
