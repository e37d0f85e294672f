"""Front-filling trials (`--front-fill N`): the one axis of the space whose effect is known, the
edit's strength, walked on purpose where the Pareto front has its widest gap.

Every trial's edit has a strength: the components' peak weights, which every layer's weight is a
share of (a kernel's edge is a ratio of its peak; a subspace's extra directions are weighted
w * gamma^(i-1)), so multiplying both peak weights by s multiplies the whole edit by s
(`params.scaled_params`). Along that line the two objectives move predictably. The KL divergence
of the edited model from the unedited one has its minimum, 0, at s = 0, so to second order

    KL(s) = s^2 * (1/2) d^T F d + O(s^3),

with d the edit and F the Fisher metric of the model's next-token distributions on the harmless
prompts: a trial at (R_b, K_b) scaled by s lands near KL s^2 K_b. Its refusals, as a rule, rise
back towards the unedited model's as it is weakened, so a weakened copy of a front trial lands
between it and the unedited model. A multivariate TPE sampler does not know any of this: it draws
each parameter from densities around good trials, and on the benchmark models the stretch of a
60-trial front where refusals fall fastest is often one gap (seed 0 of the second model: from
22/64 refusals at KL 0.111 the next front trial is 7/64 at 0.195, benchmarks/RESULTS.md).

The rule, every N-th trial after the start-up ones, when no trial waits in the queue: the front
(the study's `best_trials`, and the unedited model at KL 0 as its left end) is sorted by KL, and
the gap between neighbours a (less KL) and b (fewer refusals) with the largest area,
(K_b - K_a) * (R_a - R_b) with KL capped at `--kl-limit` (the most a trial inside it can add to
the hypervolume), is filled: b scaled down to the gap's middle KL, s = sqrt(K_mid / K_b); if that
way was tried, a scaled up to it, s = sqrt(K_mid / K_a), within `--max-weight`; a gap tried both
ways is passed over for the next largest. A way is tried when some trial on the same line (the
same sampled edit at any strength) already lies inside the gap, on the front or not: the front
changes as trials finish and the same gap comes back between new neighbours, and on a model
scored on few prompts (the default benchmark's 16) a weakened copy of the 0-refusal trial that
refuses once more is dominated, so a rule that only remembered pairs of trials asked the same
question again (measured: four of the eight fills of a default-model study, benchmarks/RESULTS.md).
The trial is queued through Optuna's public `enqueue_trial` with the user attribute `front_fill`
(source trial, the gap's other end, the line, scale, target KL):
it is scored, stopped early, replayed and exported like any other trial, and the sampler learns
from it as from its own. Several workers may each queue one now and then; what they queue is
still a trial of the space.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.config import Settings
from optimizer.params import scaled_params
from optimizer.storage import counted_trials

ATTR = "front_fill"


@dataclass(frozen=True)
class Point:
    """A trial's objectives; `number` None for the unedited model. `line`: the sampled trial whose
    edit this one is, scaled (itself when it was sampled)."""

    number: int | None
    rate: float
    kl: float
    line: int | None = None


@dataclass(frozen=True)
class Fill:
    """Trial `source` scaled by `scale`, aimed at `target_kl` in its gap with trial `toward`."""

    source: int
    toward: int | None
    scale: float
    target_kl: float
    line: int


def next_fill(
    front: list[Point], baseline: Point, done: list[Point], tried: set[tuple[int, int | None]], kl_limit: float
) -> Fill | None:
    """The fill for the widest gap of `front` not yet tried (see the module docstring); None if
    every gap was tried both ways. A way is tried when a finished trial of the same line (`done`)
    already lies in the gap, whatever its refusals (the edit at that strength is known), or when a
    fill from the same source towards the same neighbour was queued before (`tried`: it may have
    landed outside the gap)."""
    chain = [baseline, *sorted((p for p in front if p.kl < kl_limit), key=lambda p: p.kl)]
    gaps = [((min(b.kl, kl_limit) - a.kl) * (a.rate - b.rate), a, b) for a, b in itertools.pairwise(chain)]

    def open_way(end: Point, other: Point, low: float, high: float) -> bool:
        if end.number is None or end.kl <= 0 or (end.number, other.number) in tried:
            return False
        return not any(p.line == end.line and low < p.kl < high for p in done)

    for area, a, b in sorted(gaps, key=lambda g: g[0], reverse=True):
        if area <= 0:
            break
        middle = (a.kl + b.kl) / 2
        for end, other in ((b, a), (a, b)):  # the stronger edit weakened first, then the weaker strengthened
            if open_way(end, other, a.kl, b.kl):
                assert end.number is not None and end.line is not None
                return Fill(end.number, other.number, math.sqrt(middle / end.kl), middle, end.line)
    return None


def line_of(trial: FrozenTrial) -> int:
    return trial.user_attrs[ATTR]["line"] if ATTR in trial.user_attrs else trial.number


def tried_fills(trials: list[FrozenTrial]) -> set[tuple[int, int | None]]:
    return {(t.user_attrs[ATTR]["from"], t.user_attrs[ATTR]["toward"]) for t in trials if ATTR in t.user_attrs}


class FrontFill:
    """The Optuna callback that queues a front-filling trial every `--front-fill` trials after the
    start-up ones (nothing when it is 0)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def due(self, study: optuna.Study) -> bool:
        every, start = self.settings.front_fill, self.settings.startup_trials
        if every == 0:  # off: no read of the storage after every trial
            return False
        done = counted_trials(study)
        return start <= done < self.settings.trials and (done - start) % every == every - 1

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.due(study):
            return
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        base = next((t for t in trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE), None)
        if base is None:
            return
        baseline = Point(None, base.values[0], 0.0)
        point = lambda t: Point(t.number, t.values[0], t.values[1], line_of(t))
        front = [point(t) for t in study.best_trials if not t.user_attrs.get("baseline")]
        done = [point(t) for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]
        by_number = {t.number: t for t in trials}
        tried = tried_fills(trials)
        while (fill := next_fill(front, baseline, done, tried, self.settings.kl_limit)) is not None:
            source = by_number[fill.source].params
            params = scaled_params(source, fill.scale, self.settings)
            if params != source:  # a copy clamped back to its source (scaled up at --max-weight) is passed over
                record = {"from": fill.source, "toward": fill.toward, "line": fill.line}
                aim = {"scale": fill.scale, "target_kl": fill.target_kl}
                study.enqueue_trial(params, user_attrs={ATTR: {**record, **aim}})
                return
            tried.add((fill.source, fill.toward))
