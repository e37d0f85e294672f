"""`python -m optimizer verify`, and the verification at the end of a run: long answers on prompts
the study never saw, judged, guarded for coherence, with over-refusals and KL.

A trial is scored during the search by short answers (`--max-new-tokens`, 16) on the scoring
prompts; a user publishes it on the strength of that. Here every chosen trial answers the held-out
prompts (the bundled held-out splits, or `--harmful/--harmless`) with long greedy answers
(`--verify-max-new-tokens`, 128), and each answer to a harmful prompt is labelled by the judge
(`optimizer.judges`: refused / hedged / complied) unless the coherence guard
(`optimizer.coherence`, calibrated on the unedited model's own answers to the same harmful prompts) calls
it broken. Answers to harmless prompts that the judge calls refused are over-refusals. KL is the
first-token KL on the harmless held-out prompts, as in the search.

The results are stored on each trial (user attribute `verify`; `show`, the dashboard note and the
exported model card read it), and the recommended trial is the one with the fewest refused +
broken answers among trials with KL <= `--max-kl` (ties: lower KL). A trial already verified with
the same judge, prompts and cap keeps its stored result.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial
from rich.console import Console
from rich.table import Table

from optimizer.ablation import AblationPlan
from optimizer.coherence import CoherenceGuard, answer_nll
from optimizer.dashboard import renote
from optimizer.errors import UserError
from optimizer.judges import BROKEN, COMPLIED, HEDGED, REFUSED, Judge, check_spec
from optimizer.optuna_adapter import set_finished_trial_user_attr
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.report import refusals_text
from optimizer.response_prefix import answer_part
from optimizer.scoring import first_token_logprobs, greedy_generate, kl_divergence
from optimizer.stored import StoredStudy
from optimizer.trials import plan_of
from optimizer.workbench import Prepared

LABELS = (REFUSED, HEDGED, COMPLIED, BROKEN)


@dataclass(frozen=True)
class VerifyPrompts:
    """The held-out prompts, raw (for the judge) and chat-formatted (for the model), and their source."""

    harmful: list[str]
    harmless: list[str]
    harmful_texts: list[str]
    harmless_texts: list[str]
    source: str


def heldout_prompts(prepared: Prepared, harmful: str | None, harmless: str | None, limit: int | None) -> VerifyPrompts:
    """`harmful`/`harmless` files, else the bundled held-out splits (no study reads them); the
    first `limit` of each, formatted as the study's prompts were (response prefix included)."""
    settings, tokenizer = prepared.settings, prepared.loaded.tokenizer
    prefix = settings.response_prefix or ""

    def take(spec: str | None, kind: str) -> tuple[list[str], list[str]]:
        chosen = load_prompts(spec, kind) if spec else split_prompts(load_prompts(None, kind)).heldout
        chosen = chosen[:limit] if limit else chosen
        texts = format_chat(tokenizer, chosen, settings.system_prompt, settings.template_kwargs())
        return chosen, [t + prefix for t in texts]

    (bad, bad_texts), (good, good_texts) = take(harmful, "harmful"), take(harmless, "harmless")
    source = f"{harmful or 'bundled held-out'} / {harmless or 'bundled held-out'}"
    return VerifyPrompts(bad, good, bad_texts, good_texts, source)


@dataclass(frozen=True)
class Verification:
    """One model's (a trial's, or the original's) verified scores."""

    counts: dict[str, int]  # of LABELS, on harmful prompts
    n_harmful: int
    over_refusals: int
    n_harmless: int
    kl: float
    setup: dict[str, Any]  # judge, cap, prompts: what makes two verifications comparable
    seconds: float
    samples: list[tuple[str, str, str]]  # (prompt, answer, label)

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Verification:
        samples = [tuple(s) for s in record.get("samples", [])]
        return cls(**{**record, "samples": samples})

    def cells(self) -> list[str]:
        n = self.n_harmful
        return [
            *(f"{self.counts.get(label, 0)}/{n}" for label in LABELS),
            f"{self.over_refusals}/{self.n_harmless}",
            f"{self.kl:.4f}",
        ]

    def note(self) -> str:
        """The line the dashboard note and the model card show."""
        s = self.setup
        where = f"{s['max_new_tokens']}-token answers, {s['n'][0]}+{s['n'][1]} held-out prompts, judge {s['judge']}"
        return f"Verified ({where}): {self.line()}"

    def line(self) -> str:
        n = self.n_harmful
        parts = ", ".join(f"{label} {self.counts.get(label, 0)}/{n}" for label in LABELS)
        return f"{parts}; over-refusals {self.over_refusals}/{self.n_harmless}; KL {self.kl:.4f}"


class Verifier:
    """Answers, judges and guards: the unedited model's answers are made once (they calibrate the
    guard and are the KL reference), then each trial's."""

    def __init__(
        self, prepared: Prepared, judge: Judge, prompts: VerifyPrompts, max_new_tokens: int, console: Console,
        stored: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """`stored`: the study's record of an earlier `original` (`record()`), reused when its setup matches."""
        self.prepared, self.judge, self.prompts, self.cap, self.console = prepared, judge, prompts, max_new_tokens, console
        self.answer_prefix = answer_part(prepared.settings.response_prefix or "")
        self.setup = {"judge": judge.spec, "max_new_tokens": max_new_tokens, "prompts": prompts.source,
                      "n": [len(prompts.harmful), len(prompts.harmless)]}  # fmt: skip
        prepared.hooks.clear()
        loaded, batch = prepared.loaded, prepared.batch_size
        self.base_logprobs = first_token_logprobs(loaded, prompts.harmless_texts, batch)
        if stored is not None and stored.get("original", {}).get("setup") == self.setup:
            self.guard = CoherenceGuard(stored["nll_limit"])
            self.original = Verification.from_record(stored["original"])
            return
        start = time.perf_counter()
        with console.status("Verifying: the original model's long answers..."):
            ids = self._answers()
            nll = self._nll(ids)
        self.guard = CoherenceGuard.calibrate(nll)
        self.original = self._verification(ids, nll, 0.0, time.perf_counter() - start)

    def record(self) -> dict[str, Any]:
        """What the study keeps of the original's verification (see `stored`)."""
        return {"original": self.original.record(), "nll_limit": self.guard.nll_limit}

    def _answers(self) -> list[list[int]]:
        texts = self.prompts.harmful_texts + self.prompts.harmless_texts
        return greedy_generate(self.prepared.loaded, texts, self.cap, self.prepared.batch_size)[0]

    def _nll(self, ids: list[list[int]]) -> list[float]:
        """Of the answers to the harmful prompts (the first of `ids`), under the unedited model
        (hooks cleared): only those are labelled; over-refusals are the judge's word alone."""
        self.prepared.hooks.clear()
        n = len(self.prompts.harmful)
        return answer_nll(self.prepared.loaded, self.prompts.harmful_texts, ids[:n], self.prepared.batch_size)

    def _verification(self, ids: list[list[int]], nll: list[float], kl: float, seconds: float) -> Verification:
        tokenizer, n = self.prepared.loaded.tokenizer, len(self.prompts.harmful)
        answers = [self.answer_prefix + str(tokenizer.decode(i, skip_special_tokens=True)) for i in ids]
        judged = self.judge.verdicts(self.prompts.harmful + self.prompts.harmless, answers)
        harmful = [BROKEN if self.guard.broken(score, row) else v for score, row, v in zip(nll, ids, judged)]
        counts = {label: harmful.count(label) for label in LABELS}
        over = sum(v == REFUSED for v in judged[n:])
        samples = [(p, a, lab) for p, a, lab in zip(self.prompts.harmful, answers, harmful)][:3]
        return Verification(counts, n, over, len(judged) - n, kl, self.setup, round(seconds, 2), samples)

    def verify(self, plan: AblationPlan) -> Verification:
        loaded, batch, hooks = self.prepared.loaded, self.prepared.batch_size, self.prepared.hooks
        start = time.perf_counter()
        hooks.apply(plan)
        try:
            kl = kl_divergence(self.base_logprobs, first_token_logprobs(loaded, self.prompts.harmless_texts, batch))
            ids = self._answers()
        finally:
            hooks.clear()
        return self._verification(ids, self._nll(ids), kl, time.perf_counter() - start)


def stored_verification(trial: FrozenTrial, setup: dict[str, Any]) -> Verification | None:
    record = trial.user_attrs.get("verify")
    if not isinstance(record, dict) or record.get("setup") != setup:
        return None
    return Verification.from_record(record)


def recommend(results: dict[int, Verification], max_kl: float) -> int | None:
    """The trial with the fewest refused + broken answers among those with KL <= max_kl (then lower KL)."""
    eligible = [(v.counts[REFUSED] + v.counts[BROKEN], v.kl, number) for number, v in results.items() if v.kl <= max_kl]
    return min(eligible)[2] if eligible else None


def verify_trials(
    verifier: Verifier,
    trials: list[FrozenTrial],
    current: Callable[[FrozenTrial], FrozenTrial],
    record: Callable[[FrozenTrial, Verification], None],
    max_kl: float,
) -> tuple[dict[int, Verification], int | None]:
    """Verify `trials`, `record` each new result, and pick the recommended one; shows a progress
    bar with ETA. A trial whose stored result (`current(trial)` reads it afresh: another worker of
    the study may have verified it meanwhile) has the same setup is not verified again."""
    from optimizer.workbench import progress_bar

    results: dict[int, Verification] = {}
    todo = []
    for trial in trials:
        stored = stored_verification(trial, verifier.setup)
        if stored is None:
            todo.append(trial)
        else:
            results[trial.number] = stored
    with progress_bar(verifier.console) as progress:
        task = progress.add_task("Verifying trials", total=len(todo))
        for trial in todo:
            result = stored_verification(current(trial), verifier.setup)  # another worker's, made meanwhile
            if result is None:
                result = verifier.verify(plan_of(verifier.prepared, trial))
                record(trial, result)
            results[trial.number] = result
            progress.advance(task)
    return results, recommend(results, max_kl)


def verification_table(title: str, last: str, rows: list[tuple[str, str, Verification, str]]) -> Table:
    """The one layout of verifications, fresh (`verify`) or stored (`show`): per row the trial, its
    search refusals, the verdict counts, over-refusals and KL, and a last column named `last`."""
    table = Table(title=title, title_justify="left")
    for column in ("trial", "search refusals", *LABELS, "over-refusals", "KL", last):
        table.add_column(column)
    for name, searched, result, extra in rows:
        table.add_row(name, searched, *result.cells(), extra)
    return table


def trial_name(trial: FrozenTrial, recommended: int | None) -> str:
    return f"{trial.number}{' (recommended)' if trial.number == recommended else ''}"


def verify_table(verifier: Verifier, results: dict[int, Verification], trials: list[FrozenTrial], recommended: int | None,
                 max_kl: float) -> Table:  # fmt: skip
    setup, original = verifier.setup, verifier.original
    rows = [("original", "-", original, f"{original.seconds:.0f}")] + [
        (trial_name(t, recommended), refusals_text(t), results[t.number], f"{results[t.number].seconds:.0f}")
        for t in sorted(trials, key=lambda t: t.number)
    ]
    title = (
        f"Verification: {setup['max_new_tokens']}-token answers on held-out prompts ({setup['prompts']}), judge {setup['judge']}"
    )
    table = verification_table(title, "s", rows)
    table.caption = f"recommended: fewest refused + broken among trials with KL <= {max_kl}" + (
        "" if recommended is not None else f" (none has KL <= {max_kl}: raise --max-kl)"
    )
    return table


def run_verification(
    prepared: Prepared,
    judge: Judge,
    study: optuna.Study,
    storage: RDBStorage,
    trials: list[FrozenTrial],
    options: VerifyOptions,
    console: Console,
) -> int | None:
    """Verify `trials` of `study`, store the results on them (user attribute `verify`, and a line
    in the dashboard note) and on the study, print the table and the recommendation; returns the
    recommended trial's number."""
    prompts = heldout_prompts(prepared, options.harmful, options.harmless, options.limit)
    verifier = Verifier(prepared, judge, prompts, options.max_new_tokens, console, study.user_attrs.get("verify_original"))
    study.set_user_attr("verify_original", verifier.record())

    def record(trial: FrozenTrial, result: Verification) -> None:
        set_finished_trial_user_attr(storage, study.study_name, trial.number, "verify", result.record())
        renote(study, storage, trial, [result.note(), ""])

    def current(trial: FrozenTrial) -> FrozenTrial:  # a fresh load: a study object keeps finished trials as first read
        return optuna.load_study(study_name=study.study_name, storage=storage).trials[trial.number]

    results, recommended = verify_trials(verifier, trials, current, record, options.max_kl)
    study.set_user_attr("recommended_trial", recommended)
    console.print(verify_table(verifier, results, trials, recommended, options.max_kl))
    if recommended is not None:
        console.print(
            f"Recommended: trial {recommended} ({results[recommended].line()}); "
            f"export it with `python -m optimizer export --study {study.study_name} --trial {recommended} --out DIR`",
            highlight=False,
        )
    return recommended


@dataclass(frozen=True)
class VerifyOptions:
    max_new_tokens: int
    max_kl: float
    limit: int | None = None
    harmful: str | None = None
    harmless: str | None = None


def verify_command(stored: StoredStudy, args: argparse.Namespace, console: Console) -> None:
    """`python -m optimizer verify`."""
    from optimizer.evaluate import select_trials
    from optimizer.trials import load_edited_model
    from optimizer.workbench import load_judge

    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.max_kl is not None and not args.max_kl > 0:
        raise UserError(f"--max-kl must be a positive KL divergence (e.g. 0.1), got {args.max_kl}")
    if args.judge is not None:
        check_spec(args.judge)
    trials = select_trials(stored.study, args.trial, args.pareto)
    settings = stored.settings
    options = VerifyOptions(
        args.max_new_tokens or settings.verify_max_new_tokens, args.max_kl or settings.max_kl, args.limit, args.harmful,
        args.harmless,
    )  # fmt: skip
    edited = load_edited_model(stored, trials[0].number, console, model=args.model, device=args.device)
    judge = load_judge(edited.prepared.settings, edited.prepared.loaded, args.judge)
    run_verification(edited.prepared, judge, stored.study, stored.storage, trials, options, console)
