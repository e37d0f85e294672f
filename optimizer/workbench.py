"""Everything a study computes once (model, prompts, statistics, baseline) and scoring one trial.

Nothing here knows about Optuna: `study.py` drives a Workbench through `score`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
from optimizer.batching import best_batch_size, measure_batch_sizes
from optimizer.config import Settings
from optimizer.cpu_linear import pack_linear_layers
from optimizer.directions import ContrastiveStats, compute_stats, winsorize
from optimizer.errors import UserError
from optimizer.graph_decode import GraphDecoder, supports_graph_decoding
from optimizer.locks import file_lock
from optimizer.model import LoadedModel, load_model, model_fingerprint
from optimizer.packing import full_attention_only
from optimizer.prompts import format_chat, load_prompts, split_prompts, take
from optimizer.residuals import collect_residuals
from optimizer.response_prefix import DETECTION_PROMPTS, answer_part, detect
from optimizer.scoring import (
    RefusalResult, first_token_logprobs, generate_and_classify, graph_error, graph_length, kl_divergence, packed_prefill_error,
)

SAMPLE_RESPONSES = 3
# largest relative difference of a fast path's logits (a captured decode step, a packed prefill) from the
# plain path's, (16-bit, float32): a position off by one on the default model gives 0.03 in both; rounding
# alone, far less
FAST_PATH_TOLERANCE = (0.02, 1e-3)


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )


def print_discovery(loaded: LoadedModel, console: Console) -> None:
    """Where each block is ablated, found by structure: shown at every start, never silent."""
    table = Table(title=f"Ablation sites in {type(loaded.model).__name__} ({loaded.n_layers} blocks)", title_justify="left")
    for column in ("component", "layers", "modules per layer", "how it is ablated"):
        table.add_column(column, overflow="fold")
    for row in loaded.discovery.table_rows():
        table.add_row(*row)
    console.print(table)


@dataclass
class TrialScores:
    refusals: int
    n_harmful: int
    kl: float
    responses: list[tuple[str, str]]  # (prompt, response) samples
    timings: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.n_harmful


@dataclass
class Workbench:
    settings: Settings
    loaded: LoadedModel
    model_fingerprint: str
    direction_texts: tuple[list[str], list[str]]  # harmful, harmless (chat-formatted)
    harmful_prompts: list[str]  # scoring, raw
    harmful_texts: list[str]  # scoring, chat-formatted
    harmless_texts: list[str]
    batch_size: int
    console: Console
    stats: ContrastiveStats | None = None
    baseline_logprobs: torch.Tensor | None = None
    baseline_refusals: RefusalResult | None = None
    hooks: AblationHooks | None = None
    graph: GraphDecoder | None = None  # decode steps for trials replayed from a CUDA graph, once built and checked
    cache_computations: int = 0  # how many cache entries this process computed (0 on a full reuse)

    @classmethod
    def open(cls, settings: Settings, console: Console, portable: bool | None = None) -> Workbench:
        """Read prompts and load the model; nothing is written anywhere yet. `portable` picks the
        model fingerprint that a 4-bit and a full load share (default: when loading in 4-bit)."""
        harmful = split_prompts(load_prompts(settings.harmful, "harmful"))
        harmless = split_prompts(load_prompts(settings.harmless, "harmless"))
        n_dir, n_score = settings.direction_prompts, settings.scoring_prompts
        dir_b = take(harmful.direction, n_dir, "harmful direction", "--direction-prompts")
        dir_g = take(harmless.direction, n_dir, "harmless direction", "--direction-prompts")
        score_b = take(harmful.scoring, n_score, "harmful scoring", "--scoring-prompts")
        score_g = take(harmless.scoring, n_score, "harmless scoring", "--scoring-prompts")
        with console.status("Loading model..."):
            loaded = load_model(
                settings.model, settings.device, settings.dtype, settings.chat_template,
                settings.allow_missing_components, settings.quantization, console,
            )
        print_discovery(loaded, console)
        if portable is None:
            portable = settings.quantization is not None
        fmt = lambda ps: format_chat(loaded.tokenizer, ps, settings.system_prompt, settings.template_kwargs())
        batch_size = settings.batch_size or (64 if loaded.device.type == "cuda" else 16)
        bench = cls(
            settings, loaded, model_fingerprint(loaded, portable), (fmt(dir_b), fmt(dir_g)), score_b, fmt(score_b), fmt(score_g),
            batch_size, console,
        )
        bench._check_lengths()
        bench._append_response_prefix(dir_b[:DETECTION_PROMPTS] + dir_g[:DETECTION_PROMPTS])
        return bench

    def _append_response_prefix(self, sample: list[str]) -> None:
        """Append the response prefix to every prompt text: the study's (or the user's), else the one
        detected now on `sample` (raw direction prompts), which the settings then carry into the study."""
        prefix = self.settings.response_prefix
        if prefix is None:
            texts = self.direction_texts[0][:DETECTION_PROMPTS] + self.direction_texts[1][:DETECTION_PROMPTS]
            with self.console.status("Looking for a common start of the responses..."):
                found = detect(self.loaded, sample, texts, self.settings.refusal_markers, self.batch_size)
            for line in found.lines:
                self.console.print(line, markup=False, highlight=False)
            prefix = found.append
            self.settings = dataclasses.replace(self.settings, response_prefix=prefix)
        elif prefix:
            self.console.print(f"Appending the response prefix {prefix!r} to every prompt", markup=False, highlight=False)
        if prefix:
            self.direction_texts = ([t + prefix for t in self.direction_texts[0]], [t + prefix for t in self.direction_texts[1]])
            self.harmful_texts = [t + prefix for t in self.harmful_texts]
            self.harmless_texts = [t + prefix for t in self.harmless_texts]
            self._check_lengths()

    def _check_lengths(self) -> None:
        """Every prompt plus its longest answer must fit the model's context."""
        context = getattr(self.loaded.model.config.get_text_config(), "max_position_embeddings", None)
        if not context:
            return
        texts = [*self.direction_texts[0], *self.direction_texts[1], *self.harmful_texts, *self.harmless_texts]
        lengths = [len(ids) for ids in self.loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        longest = max(range(len(texts)), key=lengths.__getitem__)
        if lengths[longest] + self.settings.max_new_tokens > context:
            raise UserError(
                f"a prompt is {lengths[longest]} tokens long (+{self.settings.max_new_tokens} for the answer), over the model's "
                f"context of {context}; shorten it or remove it: {texts[longest][:80]!r}..."
            )

    # -- identities ---------------------------------------------------------------------------

    def scoring_fingerprint(self) -> str:
        """What makes two trials' scores comparable: model, scoring prompts, length cap, markers."""
        s = self.settings
        return _hash(self.model_fingerprint, self.harmful_texts, self.harmless_texts, s.max_new_tokens, sorted(s.refusal_markers))

    def directions_fingerprint(self) -> str:
        winsorize = [self.settings.winsorize] if self.settings.winsorize else []  # absent when off: older studies keep their hash
        return _hash(self.model_fingerprint, self.direction_texts, *winsorize)

    def _numeric_fingerprint(self, base: str) -> str:
        # cached tensors also depend on the dtype and device kind they were computed in
        return _hash(base, str(self.loaded.dtype), self.loaded.device.type)

    # -- one-time computations ----------------------------------------------------------------

    def prepare(self, cache_dir: Path, with_baseline: bool = True) -> None:
        """Load the statistics (and the baseline) from the cache, computing what is missing or stale;
        with the baseline (a study, which scores trials), also capture the decode step on CUDA.

        Workers sharing the cache folder take turns: one computes, the others wait and then load.
        """
        if with_baseline and self.loaded.device.type == "cpu":  # only a study scores trials
            pack_linear_layers(self.loaded, self.console)  # a study never changes the weights
            self._use_packed_prefill()
        waiting = lambda: self.console.print(f"Another worker is computing the cache in {cache_dir}; waiting for it...")
        with file_lock(cache_dir / ".lock", on_wait=waiting):
            self.stats = self._cached_stats(cache_dir)
            if not self.settings.batch_size:
                self.batch_size = self._cached_batch_size(cache_dir)
            if with_baseline:
                self.baseline_logprobs, self.baseline_refusals = self._cached_baseline(cache_dir)
        if with_baseline and supports_graph_decoding(self.loaded):  # only the study scores trials
            # hooks that a captured decode step can read: fixed buffers, overwritten per trial
            self.hooks = AblationHooks(self.loaded, self.settings.norm_preserving, static=True)
            self.graph = self._graph_decoder()
            if self.graph is not None:
                return
            self.hooks.remove()
        self.hooks = AblationHooks(self.loaded, self.settings.norm_preserving)

    def _note_miss(self, miss: cache.CacheMiss) -> None:
        self.console.print(f"[yellow]{miss}[/]: computing it now")
        self.cache_computations += 1

    def _cached_stats(self, cache_dir: Path) -> ContrastiveStats:
        fp = self._numeric_fingerprint(self.directions_fingerprint())
        try:
            tensors, _ = cache.load_entry(cache_dir, "directions", fp, self.loaded.device)
            self.console.print(f"Reusing cached direction statistics from {cache_dir}")
            return ContrastiveStats.from_tensors(tensors)
        except cache.CacheMiss as miss:
            self._note_miss(miss)
        harmful_texts, harmless_texts = self.direction_texts
        with progress_bar(self.console) as progress:
            task = progress.add_task("Residuals", total=len(harmful_texts) + len(harmless_texts))
            advance = lambda n: progress.advance(task, n)
            harmful = collect_residuals(self.loaded, harmful_texts, self.batch_size, advance)
            harmless = collect_residuals(self.loaded, harmless_texts, self.batch_size, advance)
        start = time.perf_counter()
        if self.settings.winsorize:
            harmful, harmless = winsorize(harmful, harmless, self.settings.winsorize)
        stats = compute_stats(harmful, harmless)
        self.console.print(f"Contrastive-PCA statistics for {stats.n_layers} layers in {time.perf_counter() - start:.2f} s ({stats.nbytes() / 2**20:.1f} MiB)")
        cache.save_entry(cache_dir, "directions", fp, stats.tensors(), {})
        return stats

    def _cached_batch_size(self, cache_dir: Path) -> int:
        """The fastest batch size for this model, device and prompts, measured once per study."""
        fp = self._numeric_fingerprint(self.scoring_fingerprint())
        try:
            _, values = cache.load_entry(cache_dir, "batch_size", fp)
            return int(values["batch_size"])
        except (cache.CacheMiss, KeyError, ValueError, TypeError):
            pass
        with self.console.status("Measuring the fastest batch size..."):
            timings = measure_batch_sizes(self.loaded, self.harmful_texts)
        best = best_batch_size(timings)
        table = ", ".join(f"{size}: {1000 * t:.0f} ms" for size, t in timings.items())
        self.console.print(f"Batch size {best} (time per prompt by batch size: {table})")
        cache.save_entry(cache_dir, "batch_size", fp, {}, {"batch_size": best, "seconds_per_prompt": timings})
        return best

    def _cached_baseline(self, cache_dir: Path) -> tuple[torch.Tensor, RefusalResult]:
        fp = self._numeric_fingerprint(self.scoring_fingerprint())
        try:
            tensors, values = cache.load_entry(cache_dir, "baseline", fp, self.loaded.device)
            self.console.print("Reusing cached baseline log-probabilities and refusals")
            return tensors["logprobs"], RefusalResult(values["refused"], values["responses"], values["tokens"])
        except cache.CacheMiss as miss:
            self._note_miss(miss)
        with self.console.status("Baseline: first-token log-probabilities and refusals of the unedited model..."):
            logprobs = first_token_logprobs(self.loaded, self.harmless_texts, self.batch_size)
            refusals = self._refusals()
        values = {"refused": refusals.refused, "responses": refusals.responses, "tokens": refusals.tokens_generated}
        cache.save_entry(cache_dir, "baseline", fp, {"logprobs": logprobs}, values)
        return logprobs, refusals

    def _refusals(self, graph: GraphDecoder | None = None) -> RefusalResult:
        s = self.settings
        return generate_and_classify(
            self.loaded, self.harmful_texts, s.max_new_tokens, s.refusal_markers, self.batch_size,
            answer_prefix=answer_part(s.response_prefix or ""), graph=graph,
        )

    def _use_packed_prefill(self) -> None:
        """Prefill without padding (where the prefill is bound by arithmetic, a quarter less work),
        if it reproduces the padded path's logits."""
        loaded, texts = self.loaded, self.harmful_texts
        if not full_attention_only(loaded):
            return  # a packed row would carry one prompt's state into the next
        check = lambda: packed_prefill_error(loaded, texts, min(self.batch_size, len(texts)))
        error = self._checked_fast_path(check, "Prefilling padded batches", "the packed prefill")
        if error is not None:
            loaded.packed_prefill = True
            self.console.print(f"Prompts prefilled without padding (vs padded batches: relative difference {error:.1e})")

    def _graph_decoder(self) -> GraphDecoder | None:
        """Decode steps captured as a CUDA graph (through the hooks, unedited), if the first step
        reproduces the eager path's logits."""
        texts, loaded = self.harmful_texts, self.loaded
        graphs = []

        def check() -> float:
            length = graph_length(loaded, texts, self.settings.max_new_tokens)
            graphs.append(GraphDecoder(loaded, min(self.batch_size, len(texts)), length, capture=loaded.device.type == "cuda"))
            return graph_error(loaded, graphs[0], texts)

        error = self._checked_fast_path(check, "Decoding eagerly", "capturing the decode step")
        if error is None:
            return None
        self.console.print(f"Decode steps replayed from a CUDA graph (first step vs eager: relative difference {error:.1e})")
        return graphs[0]

    def _checked_fast_path(self, check: Callable[[], float], fallback: str, what: str) -> float | None:
        """`check()`'s relative difference of a fast path from the plain one, if within tolerance;
        None otherwise, with `fallback` and the reason on the console."""
        tolerance = FAST_PATH_TOLERANCE[self.loaded.dtype == torch.float32]
        try:
            error = check()
        except Exception as e:  # noqa: BLE001 (an architecture the fast path does not fit: the plain path is always right)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.console.print(f"[yellow]{fallback}: {what} failed ({type(e).__name__}: {first_line})[/]")
            return None
        if not error < tolerance:
            self.console.print(f"[yellow]{fallback}: {what} gives logits that differ from the plain path's by {error:.2g} (> {tolerance})[/]")
            return None
        return error

    # -- trials -------------------------------------------------------------------------------

    def score(self, plan: AblationPlan) -> TrialScores:
        """Refusals and KL of the model edited by `plan` (the unedited model's come from the cache)."""
        assert self.hooks is not None and self.baseline_refusals is not None, "call prepare() first"
        if plan.is_identity():
            return self._scores(self.baseline_refusals, 0.0, {}, from_cache=True)
        timings = {}
        start = time.perf_counter()
        self.hooks.apply(plan)
        try:
            timings["apply_s"] = time.perf_counter() - start
            start = time.perf_counter()
            kl = kl_divergence(self.baseline_logprobs, first_token_logprobs(self.loaded, self.harmless_texts, self.batch_size))
            timings["kl_s"] = time.perf_counter() - start
            start = time.perf_counter()
            refusals = self._refusals(self.graph)
            timings["refusals_s"] = time.perf_counter() - start
        finally:
            self.hooks.clear()
        return self._scores(refusals, kl, timings)

    def _scores(self, refusals: RefusalResult, kl: float, timings: dict[str, float], from_cache: bool = False) -> TrialScores:
        samples = list(zip(self.harmful_prompts, refusals.responses))[:SAMPLE_RESPONSES]
        return TrialScores(refusals.count, len(refusals.refused), kl, samples, timings, from_cache)
