"""A run's one-time work in two frozen steps, and scoring one trial.

- `resolve(settings, console)` -> `RunSpec`: prompts read, split and chat-formatted, the model
  loaded, the response prefix fixed (the study's or the user's, else detected now on the unedited
  model), lengths checked against the context, and the study identity
  (`optimizer.identity.StudyIdentity`). Nothing is written anywhere, so a bad input leaves the
  study and its cache as they were.
- `prepare(spec, cache_dir)` -> `Prepared`: the direction statistics and the batch size (from the
  cache, computed where missing or stale), plain ablation hooks and, with `fitted` among the
  methods, a `FittedDirection`: what export, eval and chat need.
- `prepare_scoring(spec, cache_dir)` -> `Scorer`: the same, plus the judge, the fast paths chosen once
  (each checked against the plain path, and left off with the reason printed where it disagrees:
  the CPU's by `cpu_fast_paths` before the batch size is measured on them, the GPU's decode graph
  by `choose_fast_paths` at that size) and the unedited model's scores (cached). Only a study
  scores trials.

Every result is a frozen dataclass made complete: no field is filled in later, no flag is flipped
on a shared object. The one answer given later is the fitted direction's (`FittedDirection`): built
complete, it fits (or reads) the direction when a trial first asks for it, once, because no trial
of the statistics' methods needs it and the fit is minutes of one-time work on a CPU where the
seeded starts reach a good front in seconds. Nothing here knows about Optuna: `study.py` drives a
`Scorer` through `score`. Workers sharing a cache folder take turns under a file lock: one
computes, the others load.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from optimizer import cache
from optimizer.ablation import AblationHooks, AblationPlan
from optimizer.batching import best_batch_size, measure_batch_sizes, most_prompts_probed
from optimizer.config import Settings
from optimizer.cpu_linear import pack_linear_layers
from optimizer.directions import ContrastiveStats, compute_stats, winsorize
from optimizer.errors import UserError
from optimizer.fitting import FIT_STEPS, TARGET_TOKENS, TARGET_WEIGHT, fitted_direction
from optimizer.front import Front
from optimizer.graph_decode import GraphDecoder, supports_graph_decoding
from optimizer.identity import StudyIdentity
from optimizer.judges import Judge, make_judge
from optimizer.locks import file_lock
from optimizer.model import LoadedModel, load_model
from optimizer.packing import full_attention_only
from optimizer.params import PlanInfo, TrialParams, plan_for, statistics_set, statistics_sets
from optimizer.prompts import format_chat, load_prompts, split_prompts, take
from optimizer.residuals import check_finite, collect_residuals, layer_residuals
from optimizer.response_prefix import DETECTION_PROMPTS, answer_part, detect
from optimizer.scoring import (
    RefusalResult,
    first_token_logprobs,
    generate_and_classify,
    graph_error,
    graph_length,
    kl_divergence,
    packed_prefill_error,
)

SAMPLE_RESPONSES = 3
# largest relative difference of a fast path's logits (a captured decode step, a packed prefill) from the
# plain path's, (16-bit, float32): a position off by one on the default model gives 0.03 in both; rounding
# alone, far less
FAST_PATH_TOLERANCE = (0.02, 1e-3)


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def print_discovery(loaded: LoadedModel, console: Console) -> None:
    """Where each block is ablated, found by structure: shown at every start, never silent."""
    title = f"Ablation sites in {type(loaded.model).__name__} ({loaded.n_layers} blocks)"
    table = Table(title=title, title_justify="left")
    for column in ("component", "layers", "modules per layer", "how it is ablated"):
        table.add_column(column, overflow="fold")
    for row in loaded.discovery.table_rows():
        table.add_row(*row)
    console.print(table)


# -- resolve ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTexts:
    """The prompts of a run, chat-formatted and ending where answers start (response prefix included)."""

    direction_harmful: list[str]
    direction_harmless: list[str]
    harmful_prompts: list[str]  # scoring, raw (for the sample responses)
    harmful: list[str]  # scoring, chat-formatted
    harmless: list[str]
    direction_prompts: tuple[list[str], list[str]]  # direction (harmful, harmless), raw (for judges that read prompts)

    def with_suffix(self, suffix: str) -> PromptTexts:
        add = lambda texts: [t + suffix for t in texts]
        return PromptTexts(
            add(self.direction_harmful), add(self.direction_harmless), self.harmful_prompts, add(self.harmful),
            add(self.harmless), self.direction_prompts,
        )  # fmt: skip

    def all(self) -> list[str]:
        return [*self.direction_harmful, *self.direction_harmless, *self.harmful, *self.harmless]


@dataclass(frozen=True)
class RunSpec:
    """Everything a run is about, resolved once: final settings (with the response prefix), the
    loaded model, the prompt texts and the study identity."""

    settings: Settings
    loaded: LoadedModel
    texts: PromptTexts
    identity: StudyIdentity
    console: Console
    default_batch_size: int  # --batch-size, else a per-device default (measured in `prepare` when not given)


def resolve(settings: Settings, console: Console, portable: bool | None = None) -> RunSpec:
    """Read prompts and load the model; nothing is written anywhere. `portable` picks the model
    fingerprint that a 4-bit and a full load share (default: when loading in 4-bit)."""
    harmful = split_prompts(load_prompts(settings.harmful, "harmful"))
    harmless = split_prompts(load_prompts(settings.harmless, "harmless"))
    n_dir, n_score = settings.direction_prompts, settings.scoring_prompts
    dir_b = take(harmful.direction, n_dir, "harmful direction", "--direction-prompts")
    dir_g = take(harmless.direction, n_dir, "harmless direction", "--direction-prompts")
    score_b = take(harmful.scoring, n_score, "harmful scoring", "--scoring-prompts")
    n_kl, kl_flag = (settings.kl_prompts, "--kl-prompts") if settings.kl_prompts else (n_score, "--scoring-prompts")
    score_g = take(harmless.scoring, n_kl, "harmless scoring", kl_flag)
    with console.status("Loading model..."):
        loaded = load_model(
            settings.model, settings.device, settings.dtype, settings.chat_template,
            settings.allow_missing_components, settings.quantization, console, settings.trust_remote_code,
        )  # fmt: skip
    print_discovery(loaded, console)
    fmt = lambda ps: format_chat(loaded.tokenizer, ps, settings.system_prompt, settings.template_kwargs())
    texts = PromptTexts(fmt(dir_b), fmt(dir_g), score_b, fmt(score_b), fmt(score_g), (dir_b, dir_g))
    check_lengths(loaded, texts, settings.max_new_tokens)
    batch_size = settings.batch_size or (64 if loaded.device.type == "cuda" else 16)
    prefix = _response_prefix(settings, loaded, texts, dir_b[:DETECTION_PROMPTS] + dir_g[:DETECTION_PROMPTS], batch_size, console)
    if prefix:
        texts = texts.with_suffix(prefix)
        check_lengths(loaded, texts, settings.max_new_tokens)
    settings = dataclasses.replace(settings, response_prefix=prefix)
    portable = settings.quantization is not None if portable is None else portable
    identity = StudyIdentity.of(
        settings, loaded, (texts.direction_harmful, texts.direction_harmless), texts.harmful, texts.harmless, portable
    )
    return RunSpec(settings, loaded, texts, identity, console, batch_size)


def _response_prefix(
    settings: Settings, loaded: LoadedModel, texts: PromptTexts, sample: list[str], batch_size: int, console: Console
) -> str:
    """The text appended to every prompt: the study's (or the user's), else the one detected now on
    `sample` (raw direction prompts), which the settings then carry into the study."""
    if settings.response_prefix is not None:
        if settings.response_prefix:
            console.print(
                f"Appending the response prefix {settings.response_prefix!r} to every prompt", markup=False, highlight=False
            )
        return settings.response_prefix
    formatted = texts.direction_harmful[:DETECTION_PROMPTS] + texts.direction_harmless[:DETECTION_PROMPTS]
    with console.status("Looking for a common start of the responses..."):
        found = detect(loaded, sample, formatted, settings.refusal_markers, batch_size)
    for line in found.lines:
        console.print(line, markup=False, highlight=False)
    return found.append


def check_lengths(loaded: LoadedModel, texts: PromptTexts, max_new_tokens: int) -> None:
    """Every prompt plus its longest answer must fit the model's context."""
    context = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if not context:
        return
    every = texts.all()
    lengths = [len(ids) for ids in loaded.tokenizer(every, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(every)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens > context:
        raise UserError(
            f"a prompt is {lengths[longest]} tokens long (+{max_new_tokens} for the answer), over the model's "
            f"context of {context}; shorten it or remove it: {every[longest][:80]!r}..."
        )


# -- prepare --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A resolved run with its direction statistics, batch size and (plain) ablation hooks."""

    spec: RunSpec
    stats: ContrastiveStats
    clipped_stats: ContrastiveStats | None  # of the clipped residuals, with --searched-winsorize
    fitted: FittedDirection | None  # with `fitted` among --direction-methods
    batch_size: int
    hooks: AblationHooks
    cache_computations: int  # cache entries this process computed while preparing (0 on a full reuse)

    def stats_for(self, params: TrialParams) -> ContrastiveStats:
        """The statistics a trial's directions come from (`statistics_set`): the clipped residuals'
        where it chose them."""
        chosen = {"directions": self.stats, "clipped_directions": self.clipped_stats}[statistics_set(params)]
        if chosen is None:
            raise ValueError("a trial chose clipped statistics in a run without --searched-winsorize")
        return chosen

    def plan(self, params: TrialParams) -> tuple[AblationPlan, PlanInfo]:
        """A trial's plan (`params.plan_for`) from its statistics and, for a trial of the fitted
        method, this run's fitted direction (fitted now if no trial has needed it yet)."""
        fitted = self.fitted.direction if self.fitted is not None and params.method == "fitted" else None
        return plan_for(params, self.stats_for(params), self.settings, fitted)

    @property
    def loaded(self) -> LoadedModel:
        return self.spec.loaded

    @property
    def settings(self) -> Settings:
        return self.spec.settings


@dataclass(frozen=True, eq=False)
class FittedDirection:
    """The fitted direction of a run with `fitted` among --direction-methods (`optimizer.fitting`),
    given when first asked for: read from the cache folder or fitted now (progress shown, saved
    there), under the cache's lock, then kept for the rest of the process.

    Why on demand: the fit is the one piece of a run's one-time work that the statistics' trials
    do not need, and it is the largest on a CPU (the default model at the default prompt counts:
    minutes on 2 cores, where loading, the statistics and the baseline take under 30 s). Fitted up
    front, it held back the seeded starts that reach a good front in seconds; asked for by the first
    trial of the method (the fitted seeded start, enqueued after the statistics' ones), it comes
    after them. A study that never tries the method never fits, and export, eval and chat of a
    trial of another method never read it."""

    spec: RunSpec
    folder: Path  # the study's cache folder
    stats: ContrastiveStats
    batch_size: int
    hooks: AblationHooks
    judge: Judge | None  # the study's; loaded if the fit needs one and none is given

    @classmethod
    def of_run(
        cls, spec: RunSpec, folder: Path, stats: ContrastiveStats, batch_size: int, hooks: AblationHooks, judge: Judge | None
    ) -> FittedDirection | None:
        """A run's fitted direction, to be fitted when asked for; None without `fitted` among the methods."""
        return cls(spec, folder, stats, batch_size, hooks, judge) if "fitted" in spec.settings.direction_methods else None

    @functools.cached_property
    def direction(self) -> torch.Tensor:
        """(d,), unit length."""
        with _locked(self.spec, self.folder):
            return _CacheUse(self.spec, self.folder).fitted(self.stats, self.batch_size, self.hooks, self.judge)


@dataclass
class _CacheUse:
    """Reads and fills one study's cache folder; counts what it had to compute."""

    spec: RunSpec
    folder: Path
    computed: int = 0

    def _miss(self, miss: cache.CacheMiss) -> None:
        self.spec.console.print(f"[yellow]{miss}[/]: computing it now")
        self.computed += 1

    def stats(
        self, batch_size: int, judge: Judge | None = None, paths: FastPaths | None = None
    ) -> tuple[ContrastiveStats, ContrastiveStats | None]:
        """The direction statistics, and with --searched-winsorize those of the clipped residuals
        (both from one pass over the direction prompts when either is missing); `judge` (loaded
        here when needed and not given) for --refused-directions; `paths`: a study's fast paths
        (checked before), which the residual pass and the answers take."""
        spec, console = self.spec, self.spec.console
        wanted = statistics_sets(spec.settings)
        found: dict[str, ContrastiveStats] = {}
        for name in wanted:
            try:
                tensors, _ = cache.load_entry(self.folder, name, spec.identity.cache_key(name), spec.loaded.device)
                what = "direction statistics" if name == "directions" else "direction statistics of the clipped residuals"
                console.print(f"Reusing cached {what} from {self.folder}")
                found[name] = ContrastiveStats.from_tensors(tensors)
            except cache.CacheMiss as miss:
                self._miss(miss)
        if len(found) < len(wanted):
            harmful, harmless = self._residuals(batch_size, judge, paths or FastPaths())
            for name, quantile in wanted.items():
                if name not in found:
                    start = time.perf_counter()
                    stats = compute_stats(*(winsorize(harmful, harmless, quantile) if quantile else (harmful, harmless)))
                    seconds, mib = time.perf_counter() - start, stats.nbytes() / 2**20
                    clipped = f" (residuals clipped at the {quantile:g} quantile)" if quantile else ""
                    console.print(
                        f"Contrastive-PCA statistics for {stats.n_layers} layers{clipped} in {seconds:.2f} s ({mib:.1f} MiB)"
                    )
                    cache.save_entry(self.folder, name, spec.identity.cache_key(name), stats.tensors(), {})
                    found[name] = stats
        return found["directions"], found.get("clipped_directions")

    def fitted(self, stats: ContrastiveStats, batch_size: int, hooks: AblationHooks, judge: Judge | None = None) -> torch.Tensor:
        """The fitted direction (`optimizer.fitting`), from the cache or fitted now (its progress
        shown with the loss); `FittedDirection` asks for it."""
        spec, console = self.spec, self.spec.console
        key = spec.identity.cache_key("fitted")
        try:
            tensors, _ = cache.load_entry(self.folder, "fitted_direction", key, spec.loaded.device)
            console.print(f"Reusing the cached fitted direction from {self.folder}")
            return tensors["direction"]
        except cache.CacheMiss as miss:
            self._miss(miss)
        judge = judge or load_judge(spec.settings, spec.loaded)
        texts, prefix = spec.texts, answer_part(spec.settings.response_prefix or "")
        harmful = (texts.direction_harmful, texts.direction_prompts[0])
        with progress_bar(console) as progress:
            task = progress.add_task("Fitting the direction", total=None)
            console.print(f"Targets: {TARGET_TOKENS}-token answers of the start edit to the harmful direction prompts")

            def step(index: int, ce: float, kl: float, _direction: torch.Tensor) -> None:
                progress.update(
                    task, total=FIT_STEPS, completed=index + 1, description=f"Fitting the direction (CE {ce:.3f}, KL {kl:.4f})"
                )

            start = time.perf_counter()
            fit = fitted_direction(spec.loaded, hooks, stats, harmful, texts.direction_harmless, judge, batch_size, prefix, step)
        if fit.targets:
            console.print(
                f"Fitted the direction in {time.perf_counter() - start:.0f} s ({FIT_STEPS} steps, "
                f"towards the answers to {fit.targets} of {fit.prompts} harmful direction prompts; {fit.layout})"
            )
        else:
            console.print(
                f"[yellow]The fitted direction is left unfitted: edited along the discriminant at weight {TARGET_WEIGHT:g} "
                f"over every layer, the model still refuses all {fit.prompts} harmful direction prompts, so there is no "
                "answer to fit towards; its trials use the discriminant's direction at mid-depth, at every layer. To leave "
                "the method out: --direction-methods contrastive,discriminant[/]"
            )
        direction = fit.direction
        cache.save_entry(self.folder, "fitted_direction", key, {"direction": direction}, {})
        return direction

    def _residuals(self, batch_size: int, judge: Judge | None, paths: FastPaths) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's residuals (L, n, d) of the harmful and the harmless direction prompts."""
        spec, console = self.spec, self.spec.console
        if spec.settings.refused_directions:
            judge = judge or load_judge(spec.settings, spec.loaded)
            harmful, harmless = refused_direction_residuals(spec, judge, batch_size, paths)
        else:
            texts_b, texts_g = spec.texts.direction_harmful, spec.texts.direction_harmless
            with progress_bar(console) as progress:
                task = progress.add_task("Residuals", total=len(texts_b) + len(texts_g))
                advance = lambda n: progress.advance(task, n)
                harmful = collect_residuals(spec.loaded, texts_b, batch_size, advance, paths.packed_prefill)
                harmless = collect_residuals(spec.loaded, texts_g, batch_size, advance, paths.packed_prefill)
        normed_last = spec.settings.normed_last_direction
        harmful, harmless = layer_residuals(harmful, normed_last), layer_residuals(harmless, normed_last)
        check_finite(spec.loaded, harmful)
        check_finite(spec.loaded, harmless)
        return harmful, harmless

    def batch_size(self, packed_prefill: bool = False) -> int:
        """--batch-size, else the fastest batch size for this model, device and prompts, measured once
        per study on the path the trials take (`packed_prefill`: the CPU's prefill without padding)."""
        spec = self.spec
        if spec.settings.batch_size:
            return spec.settings.batch_size
        key = spec.identity.cache_key("scoring")
        try:
            _, values = cache.load_entry(self.folder, "batch_size", key)
            return int(values["batch_size"])
        except (cache.CacheMiss, KeyError, ValueError, TypeError):
            pass
        texts = spec.texts.harmful
        most = most_prompts_probed(spec.loaded, texts)
        with progress_bar(spec.console) as progress:  # ETA for the longest search: the descent usually stops sooner
            task = progress.add_task("Measuring the fastest batch size", total=most)
            timings = measure_batch_sizes(spec.loaded, texts, packed_prefill, lambda n: progress.advance(task, n))
            progress.update(task, completed=most)
        best = best_batch_size(timings)
        table = ", ".join(f"{size}: {1000 * timings[size]:.0f} ms" for size in sorted(timings))
        spec.console.print(f"Batch size {best} (time per prompt by batch size: {table})")
        cache.save_entry(self.folder, "batch_size", key, {}, {"batch_size": best, "seconds_per_prompt": timings})
        return best

    def baseline(self, batch_size: int, paths: FastPaths, judge: Judge) -> tuple[torch.Tensor, RefusalResult]:
        spec = self.spec
        key = spec.identity.cache_key("scoring")
        try:
            tensors, values = cache.load_entry(self.folder, "baseline", key, spec.loaded.device)
            spec.console.print("Reusing cached baseline log-probabilities and refusals")
            return tensors["logprobs"], RefusalResult(values["refused"], values["responses"], values["tokens"])
        except cache.CacheMiss as miss:
            self._miss(miss)
        with spec.console.status("Baseline: first-token log-probabilities and refusals of the unedited model..."):
            logprobs = first_token_logprobs(spec.loaded, spec.texts.harmless, batch_size, paths.packed_prefill)
            refusals = refusals_of(spec, judge, batch_size, paths)
        values = {"refused": refusals.refused, "responses": refusals.responses, "tokens": refusals.tokens_generated}
        cache.save_entry(self.folder, "baseline", key, {"logprobs": logprobs}, values)
        return logprobs, refusals


# fewest direction prompts per set that --refused-directions keeps; below it, a set is too small for its mean
MIN_REFUSED_DIRECTION_PROMPTS = 8


def refused_direction_residuals(
    spec: RunSpec, judge: Judge, batch_size: int, paths: FastPaths | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """--refused-directions: the residuals of the harmful direction prompts the unedited model
    refuses and of the harmless ones it answers, judged as the scoring prompts are (the same judge,
    cap and response prefix).

    Why (Arditi et al. 2024 filter their sets the same way): a harmful prompt the model answers adds
    its harmfulness to the harmful mean but none of the refusal the edit is meant to remove, and a
    harmless prompt it refuses carries refusal into the harmless mean; the mean difference then mixes
    "harmful" with "refused". Where a set keeps too few prompts for a mean (a model that barely
    refuses), that set is used whole and the message says so. The residuals are taken in the
    prefill of the answers (`greedy_generate`'s `residuals`): one pass over the prompts, not two.
    `paths`: the study's fast paths; where its decode step is a CUDA graph, the answers are decoded
    through one of their own, sized for the direction prompts (the study's is sized for the scoring
    prompts) and dropped afterwards.
    """
    s, console, paths = spec.settings, spec.console, paths or FastPaths()
    answer_prefix = answer_part(s.response_prefix or "")
    sets = spec.texts
    graph = None
    if paths.graph is not None:
        captured = _graph_decoder(spec, batch_size, sets.direction_harmful + sets.direction_harmless)
        graph = None if captured is None else captured[0]

    def answered(texts: list[str], prompts: list[str], advance: Callable[[int], None]) -> tuple[torch.Tensor, torch.Tensor]:
        residuals: list[torch.Tensor] = []
        refused = generate_and_classify(
            spec.loaded, texts, s.max_new_tokens, judge, batch_size, prompts,
            answer_prefix=answer_prefix, graph=graph, packed=paths.packed_prefill, residuals=residuals, on_batch=advance,
        ).refused  # fmt: skip
        return torch.tensor(refused, device=residuals[0].device), residuals[0]

    raw_b, raw_g = sets.direction_prompts
    with progress_bar(console) as progress:
        total = len(sets.direction_harmful) + len(sets.direction_harmless)
        task = progress.add_task("Answering the direction prompts (--refused-directions)", total=total)
        advance = lambda n: progress.advance(task, n)
        refused_b, harmful = answered(sets.direction_harmful, raw_b, advance)
        refused_g, harmless = answered(sets.direction_harmless, raw_g, advance)
    console.print(
        f"Directions from the {int(refused_b.sum())} of {len(refused_b)} harmful direction prompts the unedited model "
        f"refuses and the {int((~refused_g).sum())} of {len(refused_g)} harmless ones it answers (--refused-directions)"
    )

    def enough(residuals: torch.Tensor, kept: torch.Tensor, what: str) -> torch.Tensor:
        if int(kept.sum()) >= MIN_REFUSED_DIRECTION_PROMPTS:
            return residuals[:, kept]
        console.print(
            f"[yellow]only {int(kept.sum())} {what} direction prompts pass the filter (fewer than "
            f"{MIN_REFUSED_DIRECTION_PROMPTS}): using all {residuals.shape[1]} of that set[/]"
        )
        return residuals

    return enough(harmful, refused_b, "harmful"), enough(harmless, ~refused_g, "harmless")


def _locked(spec: RunSpec, cache_dir: Path):
    waiting = lambda: spec.console.print(f"Another worker is computing the cache in {cache_dir}; waiting for it...")
    return file_lock(cache_dir / ".lock", on_wait=waiting)


def prepare(spec: RunSpec, cache_dir: Path) -> Prepared:
    """Statistics and batch size from the cache (computing what is missing or stale) and plain hooks:
    for export, eval and chat, which never score trials against the baseline."""
    use = _CacheUse(spec, cache_dir)
    hooks = AblationHooks(spec.loaded, spec.settings.norm_preserving)
    with _locked(spec, cache_dir):
        stats, clipped = use.stats(spec.default_batch_size)
        batch_size = use.batch_size()
    fitted = FittedDirection.of_run(spec, cache_dir, stats, batch_size, hooks, None)
    return Prepared(spec, stats, clipped, fitted, batch_size, hooks, use.computed)


# -- fast paths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPaths:
    """How a study's trials run the model, chosen once by `choose_fast_paths`."""

    packed_linears: int = 0  # CPU: linear weights packed for oneDNN (`optimizer.cpu_linear`)
    packed_prefill: bool = False  # CPU: prompts prefilled end to end without padding (`optimizer.packing`)
    graph: GraphDecoder | None = None  # one GPU: decode steps replayed from one graph (`optimizer.graph_decode`)


def choose_fast_paths(spec: RunSpec, batch_size: int, cpu: FastPaths) -> tuple[FastPaths, AblationHooks]:
    """The fast paths this model and device allow, each checked against the plain path on the
    study's own prompts, and the hooks that go with them (fixed buffers for a captured graph):
    the CPU's, `cpu` (`cpu_fast_paths`, chosen before the batch size, which is measured on them),
    and on one GPU the decode step captured at `batch_size`.

    Only a study calls this (and `eval --refusals` the CPU's): packing and capture assume that the
    weights never change afterwards (trials edit through hooks; export bakes into a model loaded
    without them).
    """
    loaded, console = spec.loaded, spec.console
    if supports_graph_decoding(loaded) and loaded.split:
        spread = f"the model is spread by a device map ({loaded.placement()})"
        console.print(f"[yellow]Decoding eagerly: a CUDA graph is captured on one device, and {spread}[/]")
    elif supports_graph_decoding(loaded):
        hooks = AblationHooks(loaded, spec.settings.norm_preserving, static=True, rank=spec.settings.subspace_max)
        captured = _graph_decoder(spec, batch_size, spec.texts.harmful)
        if captured is not None:
            graph, error = captured
            console.print(f"Decode steps replayed from a CUDA graph (first step vs eager: relative difference {error:.1e})")
            return dataclasses.replace(cpu, graph=graph), hooks
        hooks.remove()
    return cpu, AblationHooks(loaded, spec.settings.norm_preserving)


def cpu_fast_paths(spec: RunSpec) -> FastPaths:
    """The CPU's fast paths (packed linear weights, the packed prefill), each checked against the
    plain path; none on other devices. They need no batch size, so they come first and the batch
    size is measured on them (packed products are faster at every size, and not by the same factor
    at each). `eval --refusals` takes these: the weights never change under it either (trials are
    hooked), and it answers prompts of any length, which a captured decode graph, sized for the
    study's prompts, could not hold."""
    if spec.loaded.device.type != "cpu":
        return FastPaths()
    return FastPaths(pack_linear_layers(spec.loaded, spec.console), _packed_prefill_agrees(spec))


# prompts whose packed prefill is checked against padded batches: rows of several lengths, each with
# its own block of the mask and its own part of the cache (the check's cost grows with them)
PREFILL_CHECK_ROWS = 16


def _packed_prefill_agrees(spec: RunSpec) -> bool:
    """Prefill without padding (where the prefill is bound by arithmetic, a quarter less work), if
    it reproduces the padded path's logits."""
    loaded, texts = spec.loaded, spec.texts.harmful
    if not full_attention_only(loaded):
        return False  # a packed row would carry one prompt's state into the next
    check = lambda: packed_prefill_error(loaded, texts, min(PREFILL_CHECK_ROWS, len(texts)))
    error = _checked_fast_path(spec, check, "Prefilling padded batches", "the packed prefill")
    if error is None:
        return False
    spec.console.print(f"Prompts prefilled without padding (vs padded batches: relative difference {error:.1e})")
    return True


def _graph_decoder(spec: RunSpec, batch_size: int, texts: list[str]) -> tuple[GraphDecoder, float] | None:
    """Decode steps for `texts` and their answers captured as a CUDA graph (through the static hooks,
    unedited), with the first step's relative difference from the eager path's logits, if within
    tolerance; None (and the reason printed) otherwise."""
    loaded = spec.loaded
    graphs = []

    def check() -> float:
        length = graph_length(loaded, texts, spec.settings.max_new_tokens)
        graphs.append(GraphDecoder(loaded, min(batch_size, len(texts)), length, capture=loaded.device.type == "cuda"))
        return graph_error(loaded, graphs[0], texts)

    error = _checked_fast_path(spec, check, "Decoding eagerly", "capturing the decode step")
    return None if error is None else (graphs[0], error)


def _checked_fast_path(spec: RunSpec, check: Callable[[], float], fallback: str, what: str) -> float | None:
    """`check()`'s relative difference of a fast path from the plain one, if within tolerance;
    None otherwise, with `fallback` and the reason on the console."""
    tolerance = FAST_PATH_TOLERANCE[spec.loaded.dtype == torch.float32]
    try:
        error = check()
    except Exception as e:  # noqa: BLE001 (an architecture the fast path does not fit: the plain path is always right)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        spec.console.print(f"[yellow]{fallback}: {what} failed ({type(e).__name__}: {first_line})[/]")
        return None
    if not error < tolerance:
        spec.console.print(
            f"[yellow]{fallback}: {what} gives logits that differ from the plain path's by {error:.2g} (> {tolerance})[/]"
        )
        return None
    return error


# -- scoring ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialScores:
    refusals: int  # with `stopped` "dominated" a lower bound, with "kl_limit" all (not counted): see front.py
    n_harmful: int
    kl: float
    responses: list[tuple[str, str]]  # (prompt, response) samples
    timings: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False
    stopped: str | None = None  # "dominated" or "kl_limit" when the trial was stopped early

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.n_harmful


def refusals_of(
    spec: RunSpec,
    judge: Judge,
    batch_size: int,
    paths: FastPaths,
    first: frozenset[int] = frozenset(),
    give_up: Callable[[int], bool] | None = None,
) -> RefusalResult:
    """Refusals of the model as it is now hooked, on the scoring prompts, by `judge` (see generate_and_classify)."""
    s = spec.settings
    return generate_and_classify(
        spec.loaded, spec.texts.harmful, s.max_new_tokens, judge, batch_size, spec.texts.harmful_prompts,
        answer_prefix=answer_part(s.response_prefix or ""), graph=paths.graph, packed=paths.packed_prefill,
        first=first, give_up=give_up,
    )  # fmt: skip


def load_judge(settings: Settings, loaded: LoadedModel, spec: str | None = None) -> Judge:
    """The judge `spec` (default: the settings'), loaded or connected on the model's device."""
    return make_judge(
        spec or settings.judge, settings.refusal_markers, loaded.device, settings.judge_labels, settings.judge_model,
        settings.judge_key_env,
    )  # fmt: skip


@dataclass(frozen=True)
class Scorer:
    """A prepared run that scores trials: fast paths chosen, the unedited model's scores at hand."""

    prepared: Prepared
    paths: FastPaths
    judge: Judge
    baseline_logprobs: torch.Tensor
    baseline_refusals: RefusalResult

    @property
    def spec(self) -> RunSpec:
        return self.prepared.spec

    @property
    def hooks(self) -> AblationHooks:
        return self.prepared.hooks

    @property
    def refused_first(self) -> frozenset[int]:
        """The scoring prompts the unedited model refused: a trial answers them first, so that a
        trial which cannot reach the front is settled early (front.py). Always in this order, with or
        without early stopping, so that both generate the same answers."""
        return frozenset(i for i, refused in enumerate(self.baseline_refusals.refused) if refused)

    def refusals(self, give_up: Callable[[int], bool] | None = None) -> RefusalResult:
        """Refusals of the model as it is now hooked."""
        return refusals_of(self.spec, self.judge, self.prepared.batch_size, self.paths, self.refused_first, give_up)

    def score(self, plan: AblationPlan, front: Front | None = None) -> TrialScores:
        """Refusals and KL of the model edited by `plan` (the unedited model's come from the cache).

        With `front` (the trials finished so far), a trial that cannot reach the Pareto front is
        stopped as soon as that is certain, and one whose KL is past --kl-limit is not generated;
        its scores say so (`stopped`; front.py has the rule and why results are unchanged)."""
        if plan.is_identity():
            return self._scores(self.baseline_refusals, 0.0, {}, from_cache=True)
        n = len(self.baseline_refusals.refused)
        timings = {}
        start = time.perf_counter()
        self.hooks.apply(plan)
        try:
            timings["apply_s"] = time.perf_counter() - start
            start = time.perf_counter()
            logprobs = first_token_logprobs(
                self.spec.loaded, self.spec.texts.harmless, self.prepared.batch_size, self.paths.packed_prefill
            )
            kl = kl_divergence(self.baseline_logprobs, logprobs)
            timings["kl_s"] = time.perf_counter() - start
            if front is not None and kl > self.spec.settings.kl_limit:
                return TrialScores(n, n, kl, [], timings, stopped="kl_limit")
            # only a judge that decides from prefixes counts refusals as they are found
            settle = front.refusals_that_settle(kl) if front is not None and self.judge.streaming else None
            start = time.perf_counter()
            refusals = self.refusals(None if settle is None else lambda found: found >= settle)
            timings["refusals_s"] = time.perf_counter() - start
        finally:
            self.hooks.clear()
        return self._scores(refusals, kl, timings, stopped=None if refusals.complete else "dominated")

    def _scores(
        self, refusals: RefusalResult, kl: float, timings: dict[str, float], from_cache: bool = False, stopped: str | None = None
    ) -> TrialScores:
        samples = list(zip(self.spec.texts.harmful_prompts, refusals.responses))[:SAMPLE_RESPONSES]
        return TrialScores(refusals.count, len(refusals.refused), kl, samples, timings, from_cache, stopped)


def prepare_scoring(spec: RunSpec, cache_dir: Path) -> Scorer:
    """Statistics, batch size, fast paths, the judge and the unedited model's scores: what a study
    needs to score trials. The judge is loaded (or its endpoint reached) first, so that a bad one
    stops the run before anything is written; the fast paths are chosen before the statistics and
    the baseline, which they speed up (the packed prefill and linears on CPUs: --refused-directions
    answers every direction prompt once), and the CPU's before the batch size, which is measured
    on the path the trials take."""
    judge = load_judge(spec.settings, spec.loaded)
    use = _CacheUse(spec, cache_dir)
    with _locked(spec, cache_dir):
        cpu = cpu_fast_paths(spec)
        batch_size = use.batch_size(cpu.packed_prefill)
        paths, hooks = choose_fast_paths(spec, batch_size, cpu)
        stats, clipped = use.stats(batch_size, judge, paths)
        logprobs, refusals = use.baseline(batch_size, paths, judge)
    fitted = FittedDirection.of_run(spec, cache_dir, stats, batch_size, hooks, judge)
    return Scorer(Prepared(spec, stats, clipped, fitted, batch_size, hooks, use.computed), paths, judge, logprobs, refusals)
