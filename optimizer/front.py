"""When a trial can no longer reach the Pareto front, and why stopping it then changes no result.

A trial is scored by two numbers, both minimised: R, the refusals among the N scoring prompts, and
K, the KL divergence. KL comes first and is cheap (one forward pass per harmless prompt); R is
counted while answers are generated, and only grows as more answers are judged. A finished trial
F = (R_F, K_F) dominates a trial whose count so far is c (so R >= c) and whose KL is K as soon as

    R_F <= c  and  K_F <= K,  with  R_F < c  or  K_F < K,

because then R_F <= R and K_F <= K with one of them strict, whatever the rest of the answers are.
`Front.refusals_that_settle(K)` is the smallest such c over the finished trials: R_F when K_F < K,
R_F + 1 when K_F == K. Generation stops when the count reaches it, and the trial is recorded with
(c / N, K): a lower bound on its refusals, marked as such (`early_stop: dominated`).

Why the study's results are those of scoring every trial to the end:
- a front trial is never stopped: if it were, some recorded trial G would dominate (c, K); records
  are dominated only by records, and following the chain back ends at a fully scored trial, which
  then dominates (c, K) and so the trial's true (R, K) too, since R >= c: not a front trial;
- every trial off the front stays off it: a stopped trial's record is dominated by construction, and
  a fully scored trial dominated by a trial Y is also dominated by Y's record (R_Y' <= R_Y);
- nothing is taken off the front by a record that is too low: whatever (c, K) dominates, the trial
  F that dominated (c, K) dominates too.
So `best_trials`, `show`, exports and the hypervolume are unchanged, and the sampler still learns
from the stopped trial: its values are a certified lower bound, close to the truth when the stop came
late, and dominated either way.

A trial whose KL alone is past `--kl-limit` (1 by default, the hypervolume reference: such a trial
adds nothing to the hypervolume) is not generated at all and recorded as refusing every prompt
(`early_stop: kl_limit`). That value is not a bound but a verdict: it refuses more often than the
unedited model, so the trial is infeasible (`study.REFUSES_LESS`): never on the front, and among the
sampler's bad trials, which teaches it to stay away from such edits. The
one result it can change: a trial past the limit with fewer refusals than every trial inside it would
have been on the unbounded front; a model that broken is not a result anyone exports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Front:
    """The (refusals, KL) of the trials finished so far, refusals as counts of `n` prompts."""

    points: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, values: Iterable[Sequence[float]], n: int) -> Front:
        """From Optuna's stored values (refusal rate, KL)."""
        return cls(tuple((round(rate * n), kl) for rate, kl in values))

    def refusals_that_settle(self, kl: float) -> int | None:
        """The fewest refusals at which a trial with this KL is dominated by a finished trial
        (None when no count would: every finished trial has a larger KL)."""
        return min((count if k < kl else count + 1 for count, k in self.points if k <= kl), default=None)
