"""What the fixed-kernel sweeps share (`row_norm_sweep.py`, `affine_sweep.py`, `lda_sweep.py`,
`read_sweep.py`, `refit_sweep.py`, `fisher_sweep.py`, `keyed_sweep.py`, `write_sweep.py`,
`rdo_sweep.py`): one model prepared as a study would be (cached statistics, hooks; 64 direction prompts
per set unless `--direction-prompts` says otherwise, the refused-prompt filter on, float32 on the CPU,
batch 32), the held-out prompts that score each edit, the unedited model's first-token log-probabilities
and refusal count, and the kernels held fixed while a weight is swept; and for the sweeps that need the
direction prompts themselves, those the refused-prompt filter keeps (`kept_direction_texts`). Refusals
on held-out harmful prompts by the default markers; KL of the first token on held-out harmless prompts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.ablation import AblationPlan
from optimizer.config import Settings
from optimizer.judges import MarkerJudge
from optimizer.params import Kernel, TrialParams
from optimizer.prompts import PromptSplits, format_chat, load_prompts, split_prompts
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence
from optimizer.workbench import Prepared, load_judge, prepare, resolve

KERNELS = {"p.6 f.45": (0.6, 0.45), "p.75 f.25": (0.75, 0.25), "p.5 f1": (0.5, 1.0)}  # peak, falloff (x last layer)


def arguments(weights: list[float], kernels: list[str] | None = None) -> argparse.ArgumentParser:
    """The options every sweep takes, with this sweep's default weights and kernels."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(Path.home() / ".cache/optimizer/models/smollm2-135m-refusing"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--cap", type=int, default=12)
    p.add_argument("--direction-prompts", type=int, default=64, help="per set, as `optimizer run --direction-prompts`")
    p.add_argument("--weights", type=float, nargs="+", default=weights)
    p.add_argument("--kernels", nargs="+", default=kernels or list(KERNELS), choices=list(KERNELS))
    p.add_argument("--winsorize", type=float, default=0.0, help="the residuals clipped as `optimizer run --winsorize`")
    p.add_argument(
        "--mlp-ratios", type=float, nargs="+", default=[1.0], help="the MLP's peak weight as a share of the attention's"
    )
    return p


@dataclass(frozen=True)
class Sweep:
    bench: Prepared
    splits: dict[str, PromptSplits]
    texts: dict[str, list[str]]  # held-out, formatted, `prompts` per set
    judge: MarkerJudge
    model: str
    prompts: int
    cap: int
    base_logprobs: torch.Tensor
    base_refusals: int

    @property
    def header(self) -> str:
        name, n = Path(self.model).name, self.prompts
        return f"# {name}: {n} held-out prompts per set, cap {self.cap}; unedited {self.base_refusals}/{n}"

    def params(
        self,
        kernel: str,
        weight: float,
        method: str = "mean_diff",
        direction_index: float | None = None,
        shrinkage: float | None = None,
        mlp_ratio: float = 1.0,
    ) -> TrialParams:
        """One of KERNELS at `weight` (edge ratio 0.3) for attention, and at `mlp_ratio` x `weight` for the MLP."""
        peak, falloff = KERNELS[kernel]
        last = self.bench.loaded.n_layers - 1
        k = lambda w: Kernel(peak_weight=w, peak_layer=peak * last, min_ratio=0.3, falloff=falloff * last)
        return TrialParams(method, None, direction_index, {"attn": k(weight), "mlp": k(mlp_ratio * weight)}, shrinkage=shrinkage)

    def score(self) -> tuple[int, float]:
        """Held-out refusals and first-token KL of the model as it is now edited."""
        loaded, bs = self.bench.loaded, self.bench.batch_size
        kl = kl_divergence(self.base_logprobs, first_token_logprobs(loaded, self.texts["harmless"], bs))
        return generate_and_classify(loaded, self.texts["harmful"], self.cap, self.judge, bs).count, kl

    @contextmanager
    def hooked(self, plan: AblationPlan) -> Iterator[None]:
        """The model edited by `plan` inside the block; the hooks cleared after."""
        self.bench.hooks.apply(plan)
        try:
            yield
        finally:
            self.bench.hooks.clear()

    def score_plan(self, plan: AblationPlan) -> tuple[int, float]:
        """`score` with `plan` hooked in."""
        with self.hooked(plan):
            return self.score()


@torch.inference_mode()
def forward_with_hooks(loaded, sites, hook, batch: dict) -> None:
    """One forward pass of `batch` with `hook` on every site's module (removed after)."""
    handles = [s.module.register_forward_hook(hook) for s in sites]
    try:
        loaded.model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def open_sweep(a: argparse.Namespace, study: str) -> Sweep:
    s = Settings(
        model=a.model,
        study=study,
        studies_dir=f"/tmp/{study}-sweep",
        direction_prompts=a.direction_prompts,
        scoring_prompts=8,
        max_new_tokens=a.cap,
        device="cpu",
        dtype="float32",
        batch_size=32,
        winsorize=a.winsorize,
    )
    bench = prepare(resolve(s, Console(stderr=True)), s.cache_path())
    loaded, bs = bench.loaded, bench.batch_size
    splits = {k: split_prompts(load_prompts(None, k)) for k in ("harmful", "harmless")}
    texts = {k: format_chat(loaded.tokenizer, sp.heldout[: a.prompts]) for k, sp in splits.items()}
    judge = MarkerJudge(s.refusal_markers, echo_aware=False)
    base_logprobs = first_token_logprobs(loaded, texts["harmless"], bs)
    base = generate_and_classify(loaded, texts["harmful"], a.cap, judge, bs).count
    return Sweep(bench, splits, texts, judge, a.model, a.prompts, a.cap, base_logprobs, base)


def kept_direction_texts(sweep: Sweep) -> tuple[list[str], list[str]]:
    """The direction prompts `--refused-directions` keeps: refused harmful, answered harmless."""
    spec, bs = sweep.bench.spec, sweep.bench.batch_size
    judge = load_judge(spec.settings, spec.loaded)
    texts, raw = (spec.texts.direction_harmful, spec.texts.direction_harmless), spec.texts.direction_prompts
    cap = spec.settings.max_new_tokens
    refused = [generate_and_classify(spec.loaded, t, cap, judge, bs, p).refused for t, p in zip(texts, raw)]
    return [t for t, r in zip(texts[0], refused[0]) if r], [t for t, r in zip(texts[1], refused[1]) if not r]
