"""What a study shows a person: one line per trial, the best trade-off so far, the Pareto table and `show`."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from optimizer.components import COMPONENTS

# the trade-off shown while running: fewest refusals among trials within this KL
PROGRESS_KL_LIMIT = 1.0
SHOWN_SETTINGS = (
    "trials", "direction_prompts", "scoring_prompts", "max_new_tokens", "system_prompt", "response_prefix", "seed", "sampler",
    "direction_methods", "searched_projection", "winsorize", "searched_winsorize", "alpha_max", "min_weight", "max_weight",
)  # fmt: skip


def refusals_text(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("refusals", "?"))


def trial_line(trial: FrozenTrial, done: int, total: int) -> str:
    if trial.state != TrialState.COMPLETE:
        return f"[{done}/{total}] trial {trial.number} {trial.state.name.lower()}"
    seconds = trial.user_attrs.get("timings", {}).get("total_s", 0.0)
    return f"[{done}/{total}] trial {trial.number}: refusals {refusals_text(trial)}, KL {trial.values[1]:.4f}, {seconds:.1f} s"


@dataclass(frozen=True)
class EarlyStops:
    """Trials stopped early and an estimate of the generation seconds that saved: each stopped
    trial is credited the median generation time of the fully scored trials, less its own."""

    edited: int
    kinds: dict[str, int]  # early_stop attribute (dominated, kl_limit) -> trials
    median_full_s: float | None  # median generation seconds of a fully scored trial
    saved_s: float

    @property
    def stopped(self) -> int:
        return sum(self.kinds.values())

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> EarlyStops:
        edited = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]
        generation = lambda t: t.user_attrs.get("timings", {}).get("refusals_s")
        stopped = [t for t in edited if t.user_attrs.get("early_stop")]
        full = [generation(t) for t in edited if not t.user_attrs.get("early_stop") and generation(t) is not None]
        median = statistics.median(full) if full else None
        saved = sum(max(0.0, median - (generation(t) or 0.0)) for t in stopped) if median is not None else 0.0
        return cls(len(edited), dict(Counter(t.user_attrs["early_stop"] for t in stopped)), median, saved)


def early_stop_line(study: optuna.Study) -> str | None:
    """How many trials were stopped early and about how much generation that saved."""
    stops = EarlyStops.of(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not stops.edited:
        return None
    line = (
        f"Early stop: {stops.stopped} of {stops.edited} trials stopped ({stops.kinds.get('dominated', 0)} dominated, "
        f"{stops.kinds.get('kl_limit', 0)} above the KL limit)"
    )
    if stops.stopped and stops.median_full_s is not None:
        line += f", about {stops.saved_s:.0f} s of generation saved (median fully scored trial: {stops.median_full_s:.1f} s)"
    return line


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal edited trials (the baseline left out), by number."""
    return sorted((t for t in study.best_trials if not t.user_attrs.get("baseline")), key=lambda t: t.number)


EDGE = 0.02  # a value within this share of its range from a bound sits at that bound


def bound_warnings(study: optuna.Study) -> list[str]:
    """For each bound that a setting moves (`params.WIDENED_BY`), a line when at least half of the
    front's edited trials that use the parameter (and at least two) sit at it: the best trade-offs
    may lie beyond it. A lower bound of 0 is where the parameter's meaning ends, not a setting."""
    from optimizer.params import WIDENED_BY

    front = front_trials(study)
    lines = []
    for name in sorted({n for t in front for n in t.params}):
        ends = [(end, flag) for (suffix, end), flag in WIDENED_BY.items() if name.endswith(suffix)]
        if not ends:
            continue
        using = [t for t in front if name in t.params]
        ranges = {t.number: (t.distributions[name].low, t.distributions[name].high) for t in using}  # type: ignore[attr-defined]
        for end, flag in ends:
            side = 1 if end == "upper" else 0  # index into (low, high)
            bound = max(r[1] for r in ranges.values()) if side else min(r[0] for r in ranges.values())
            if not side and bound <= 0:
                continue
            at_edge = [
                t.number
                for t in using
                if abs(ranges[t.number][side] - t.params[name]) <= EDGE * (ranges[t.number][1] - ranges[t.number][0])
            ]
            if len(at_edge) >= 2 and 2 * len(at_edge) >= len(using):
                example = f"{flag} {2 * bound:g}" if side else f"{flag} {bound / 2:g}"
                lines.append(
                    f"{len(at_edge)} of {len(using)} Pareto-optimal trials have {name} at its {end} bound {bound:g} "
                    f"(trials {', '.join(map(str, at_edge))}): better trade-offs may lie beyond it; "
                    f"widen it with {flag} (e.g. {example}) in a new study"
                )
    return lines


def best_tradeoff(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values[1] <= PROGRESS_KL_LIMIT]
    return min(done, key=lambda t: (t.values[0], t.values[1]), default=None)


def pareto_table(study: optuna.Study) -> Table:
    table = Table(title=f"Pareto-optimal trials of study {study.study_name!r}")
    for column in ("trial", "refusals", "KL divergence", "direction", "attn kernel", "mlp kernel"):
        table.add_column(column)
    table.caption = "kernel: peak weight @ peak layer, weight ratio at the edge, falloff in layers"
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for t in (t for t in done if t.user_attrs.get("baseline")):  # for reference: infeasible, so off the front
        table.add_row(f"{t.number} (baseline)", refusals_text(t), f"{t.values[1]:.4f}", "none (unedited)", "-", "-")
    for t in sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1])):
        if t.user_attrs.get("baseline"):  # a study from before the baseline was infeasible: shown above
            continue
        kernels = [
            f"{t.params[f'{c}_peak_weight']:.2f} @{t.params[f'{c}_peak_layer']:.1f}, "
            f"{t.params[f'{c}_min_ratio']:.2f}, {t.params[f'{c}_falloff']:.1f}"
            for c in COMPONENTS
        ]
        table.add_row(str(t.number), refusals_text(t), f"{t.values[1]:.4f}", str(t.user_attrs.get("direction", "")), *kernels)
    return table


def show_study(study: optuna.Study, console: Console) -> None:
    """`python -m optimizer show`: settings, baseline, trial counts and the Pareto table."""
    attrs = study.user_attrs
    console.print(f"Study {study.study_name!r}: model {attrs.get('model')} (fingerprint {attrs.get('model_fingerprint')})")
    settings = attrs.get("run_settings", {})
    console.print("Settings: " + ", ".join(f"{k}={settings.get(k)!r}" for k in SHOWN_SETTINGS if k in settings), highlight=False)
    console.print(f"Baseline refusals: {attrs.get('baseline_refusals', '?')}")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    shown = (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.PRUNED, TrialState.WAITING)
    counts = {s.name.lower(): states.count(s) for s in shown}
    console.print(
        "Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n or state in ("complete", "fail", "running"))
    )
    if counts["complete"]:
        console.print(pareto_table(study))
    verified = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "verify" in t.user_attrs]
    if verified:
        console.print(verified_table(study, verified))


def verified_table(study: optuna.Study, trials: list[FrozenTrial]) -> Table:
    """The stored verifications (`verify`), with the recommended trial."""
    from optimizer.verify import Verification, trial_name, verification_table

    recommended = study.user_attrs.get("recommended_trial")
    setup = lambda v: f"{v.setup['judge']}, {v.setup['max_new_tokens']}"
    stored = [(trial_name(t, recommended), refusals_text(t), Verification.from_record(t.user_attrs["verify"])) for t in trials]
    original = study.user_attrs.get("verify_original", {}).get("original")
    if original:
        stored.insert(0, ("original", "-", Verification.from_record(original)))
    rows = [(name, searched, v, setup(v)) for name, searched, v in stored]
    return verification_table("Verified trials (long answers on held-out prompts)", "judge, cap", rows)
