"""Reopen a finished study and rebuild the edited model of one of its trials (for export, eval, chat)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial
from rich.console import Console

from optimizer.ablation import AblationPlan
from optimizer.components import COMPONENTS
from optimizer.config import replace_checked
from optimizer.params import PlanInfo, TrialParams, replay_params, statistics_set, statistics_sets
from optimizer.stored import StoredStudy, finished_trial
from optimizer.workbench import Prepared, prepare, resolve


@dataclass(frozen=True)
class EditedModel:
    prepared: Prepared
    trial: FrozenTrial
    params: TrialParams
    plan: AblationPlan
    info: PlanInfo

    def record(self) -> dict[str, Any]:
        """What `optimizer.json` holds beside every export (folder, GGUF, adapter): where the trial
        came from and the whole edit."""
        settings, trial, loaded = self.prepared.settings, self.trial, self.prepared.loaded
        return {
            "study": settings.study,
            "trial": trial.number,
            "model": loaded.source,
            "model_fingerprint": self.prepared.spec.identity.model,
            "params": trial.params,
            "trial_params": self.params.to_json(),
            "weights": {c: self.plan.weights[c] for c in COMPONENTS},
            "subspace": {"k": self.plan.rank, "gamma": self.plan.decay, "direction_weights": "w * gamma^(i-1), i = 1..k"},
            "fallback_layers": self.info.fallback_layers,
            "scores": {"refusals": trial.user_attrs.get("refusals"), "kl_divergence": trial.values[1]},
            "edit": "W <- (I - R W_r R^T) W and b <- (I - R W_r R^T) b on every tensor each block writes to the "
            "residual stream with (attention output, MLP down projection, every expert's down projection); R: the "
            "layer's k orthonormal directions, W_r: their weights; in ablation.safetensors, per component, "
            "`<c>.directions` (L, d) the first direction of every layer and `<c>.extra_directions` (L, k-1, d) the others",
            "norm_preserving": settings.norm_preserving,
            "response_prefix": settings.response_prefix,
            "chat_template_kwargs": settings.template_kwargs(),
            "projected_directions": settings.projected_directions,
            "refused_directions": settings.refused_directions,
            # the quantile of |value| the directions' residuals were clipped at (0: not clipped)
            "winsorize": statistics_sets(settings)[statistics_set(self.params)],
            "normed_last_direction": settings.normed_last_direction,
            "trust_remote_code": settings.trust_remote_code,
            "sites": [list(row) for row in loaded.discovery.table_rows()],
        }

    def plan_of(self, trial: FrozenTrial) -> AblationPlan:
        """The ablation plan of another trial of the same study, on this model and statistics."""
        return plan_of(self.prepared, trial)


def plan_of(prepared: Prepared, trial: FrozenTrial) -> AblationPlan:
    """The ablation plan of a trial of the study, on this model and statistics."""
    params = replay_params(trial.params, prepared.loaded.n_layers, prepared.settings)
    return prepared.plan(params)[0]


def load_edited_model(
    stored: StoredStudy, number: int, console: Console,
    model: str | None = None, device: str | None = None, dtype: str | None = None, full_precision: bool = False,
) -> EditedModel:  # fmt: skip
    """Load the study's model, check it is the same model, and build trial `number`'s ablation plan.

    The plan's directions come from the study's cached statistics (recomputed if the cache was
    made on another device or dtype). Hooks are registered but not applied. `full_precision`
    loads a 4-bit study's model unquantised (for export).
    """
    trial = finished_trial(stored.study, number)
    settings = stored.settings
    portable = settings.quantization is not None
    settings = replace_checked(settings, model=model, device=device, dtype=dtype)
    if full_precision:  # the fingerprint stays the portable one the study recorded
        settings = dataclasses.replace(settings, quantization=None)
    spec = resolve(settings, console, portable=portable)
    spec.identity.check_model(stored.study.user_attrs)
    prepared = prepare(spec, settings.cache_path())
    params = replay_params(trial.params, spec.loaded.n_layers, spec.settings)
    plan, info = prepared.plan(params)
    return EditedModel(prepared, trial, params, plan, info)
