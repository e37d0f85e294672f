"""The one rule for "may this run add trials to that study?", and the fingerprints it rests on.

Two trials are comparable when they edited the same model, were scored on the same prompts with
the same answer cap and refusal markers, used directions computed from the same prompts, and
their parameters mean the same edit. Each of these is a fingerprint (a short hash):

- model: config, chat template and a sample of every weight (`model_fingerprint`);
- scoring: the model, the chat-formatted scoring prompts (response prefix included), the cap,
  the markers and the judge (`optimizer.judges`);
- directions: the model, the chat-formatted direction prompts, the winsorizing quantile (fixed, or
  searched between 0 and `--searched-winsorize`'s) and, with `--refused-directions`, how answers
  are judged (cap, markers, judge); with `fitted` among the methods, also the fit's constants
  (`optimizer.fitting.fit_constants`), so that a fitted trial is never rebuilt from another fit;
- edit variants: settings that change what the same parameters do to the weights
  (`EDIT_VARIANTS`), compared by value.

A study stores the fingerprints and the settings it was run with when it is created; a run that
resumes it, and `export`/`eval`/`chat` of its trials, check against them here and nowhere else.
When a fingerprint differs, the message names the settings that differ (read from the stored
settings), or "prompt contents" when only the files changed. Cached tensors also depend on the
dtype and device kind they were computed in (`cache_key`), which does not make trials
incomparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from optimizer.config import Settings, bool_flag_for, flag_of, settings_from_record
from optimizer.errors import UserError
from optimizer.fitting import fit_constants
from optimizer.model import LoadedModel
from optimizer.params import searched_winsorize

# Settings that change what a trial's parameters do to the model (not what is cached).
EDIT_VARIANTS = ("projected_directions", "norm_preserving", "searched_projection")
# Settings that change which trials count (the Pareto front), stored on each trial as it finishes.
OBJECTIVE_VARIANTS = ("kl_floor",)


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(loaded: LoadedModel, portable: bool = False) -> str:
    """A hash of what makes the model this model: config, chat template and a sample of every weight.

    Weight samples are rounded to bfloat16 so that the same checkpoint loaded in float32 on a CPU
    and in bfloat16 on a GPU has the same identity. `portable` (studies run on a 4-bit model)
    samples only what quantization leaves alone (embeddings and 1-D tensors), so that the full
    checkpoint loaded for export has the same identity.
    """
    digest = hashlib.sha256()
    config = loaded.model.config.to_dict()
    for volatile in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "quantization_config"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(getattr(loaded.tokenizer, "chat_template", None)).encode())
    for name, param in loaded.model.state_dict().items():
        # (bitsandbytes adds float quantization-state entries such as `q_proj.weight.absmax`)
        if portable and not (
            name.endswith((".weight", ".bias")) and param.is_floating_point() and (param.dim() <= 1 or "embed" in name)
        ):
            continue
        sample = param.detach().flatten()[:16].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def comparable_settings(settings: Settings) -> dict[str, Any]:
    """The settings that make trials comparable, by name: what a refusal names when they differ."""
    s = settings
    return {
        "scoring_prompts": s.scoring_prompts,
        "kl_prompts": s.kl_prompts or s.scoring_prompts,
        "direction_prompts": s.direction_prompts,
        "max_new_tokens": s.max_new_tokens,
        "system_prompt": s.system_prompt,
        "harmful": s.harmful or "bundled",
        "harmless": s.harmless or "bundled",
        "refusal_markers": sorted(s.refusal_markers),
        "judge": _judge(s) or ["markers:plain"],
        "template_kwargs": s.template_kwargs(),
        "response_prefix": s.response_prefix,
        "winsorize": s.winsorize,
        "searched_winsorize": searched_winsorize(s),
        "refused_directions": s.refused_directions,
        "normed_last_direction": s.normed_last_direction,
        "fitted_direction": fit_constants() if "fitted" in s.direction_methods else None,  # the fit a fitted trial used
        **{k: getattr(s, k) for k in EDIT_VARIANTS + OBJECTIVE_VARIANTS},
    }


def _judge(settings: Settings) -> list[Any]:
    """What of the judge makes counts comparable; nothing for the plain markers, so that studies
    made before judges existed keep their scoring fingerprint."""
    if settings.judge == "markers:plain":
        return []
    return [settings.judge, settings.judge_labels, settings.judge_model]


@dataclass(frozen=True)
class StudyIdentity:
    """What a study's trials are comparable by; made once per run from the resolved settings,
    the loaded model and the final prompt texts."""

    model_source: str
    model: str  # fingerprints
    scoring: str
    directions: str
    statistics: str  # of the residuals as they are (or clipped at --winsorize)
    clipped_directions: str | None  # the statistics of the clipped residuals, with --searched-winsorize
    fitted: str | None  # the fitted direction (from the statistics, the judge and the fit), with `fitted` among the methods
    numeric: tuple[str, str]  # dtype and device kind of this process (cached tensors depend on them)
    settings: dict[str, Any]  # comparable_settings of this run

    @classmethod
    def of(
        cls,
        settings: Settings,
        loaded: LoadedModel,
        direction_texts: tuple[list[str], list[str]],
        harmful_texts: list[str],
        harmless_texts: list[str],
        portable: bool,
    ) -> StudyIdentity:
        model = model_fingerprint(loaded, portable)
        judging = [settings.max_new_tokens, sorted(settings.refusal_markers), *_judge(settings)]  # how answers are judged
        scoring = _hash(model, harmful_texts, harmless_texts, *judging)
        # each absent when off, so that older studies keep their hash; the refusal filter depends on how answers are judged
        refused = ["refused", *judging]
        normed_last = ["normed-last"] if settings.normed_last_direction else []
        of_residuals = lambda *clip: _hash(
            model, direction_texts, *clip, *(refused if settings.refused_directions else []), *normed_last
        )
        winsorize = [settings.winsorize] if settings.winsorize else []
        searched = searched_winsorize(settings)
        # the study's fingerprint names the searched quantile; its two sets of statistics are those a
        # study without it, or with the clipping fixed at that quantile, would cache
        fitting = ["fitted", fit_constants()] if "fitted" in settings.direction_methods else []
        directions = of_residuals(*winsorize, *(["searched", searched] if searched else []), *fitting)
        statistics = of_residuals(*winsorize)
        clipped = of_residuals(searched) if searched else None
        fitted = _hash(statistics, *judging, *fitting) if fitting else None
        numeric = (str(loaded.dtype), loaded.device.type)
        return cls(loaded.source, model, scoring, directions, statistics, clipped, fitted, numeric, comparable_settings(settings))

    def cache_key(self, kind: str) -> str:
        """The fingerprint of a cache entry: `directions` (statistics), `clipped_directions` (those of
        the clipped residuals, with --searched-winsorize), `fitted` (the fitted direction) or `scoring`
        (baseline, batch size). All but the fitted direction also name the dtype and device kind: the
        fitted direction is the one the study's trials ablated, so export, eval and chat in another
        precision or on another device reuse it rather than fit another (and a model too large to
        fit on a CPU can be exported there)."""
        base = {
            "directions": self.statistics,
            "clipped_directions": self.clipped_directions,
            "fitted": self.fitted,
            "scoring": self.scoring,
        }[kind]
        if base is None:
            raise ValueError(f"no {kind} in this run")
        return _hash(base) if kind == "fitted" else _hash(base, *self.numeric)

    def attrs(self) -> dict[str, Any]:
        """What a new study records about itself (besides its run settings)."""
        return {
            "model": self.model_source,
            "model_fingerprint": self.model,
            "scoring_fingerprint": self.scoring,
            "directions_fingerprint": self.directions,
        }

    def check_model(self, attrs: dict[str, Any]) -> None:
        """Refuse to rebuild a study's trial on another model (export, eval, chat)."""
        if attrs.get("model_fingerprint") != self.model:
            raise UserError(
                f"the model at hand ({self.model_source}, fingerprint {self.model}) is not the study's model "
                f"({attrs.get('model')!r}, fingerprint {attrs.get('model_fingerprint')}); pass the study's model with --model"
            )

    def check_study(self, attrs: dict[str, Any], name: str) -> None:
        """Refuse to add trials to a study made with another model or other scoring settings."""
        if attrs.get("model_fingerprint") != self.model:
            raise UserError(
                f"study {name!r} was created with model {attrs.get('model')!r} (fingerprint {attrs.get('model_fingerprint')}), "
                f"not {self.model_source!r} (fingerprint {self.model}); use that model or another --study name"
            )
        stored = _stored_comparable(attrs)
        if attrs.get("scoring_fingerprint") != self.scoring or attrs.get("directions_fingerprint") != self.directions:
            differ = sorted(k for k in self.settings if stored.get(k) != self.settings[k]) or ["prompt contents"]
            switches = [_asked_for(k, stored[k]) for k in differ if isinstance(stored.get(k), (bool, float))]
            how = f" (resume it {', '.join(switches)})" if switches else ""
            raise UserError(
                f"study {name!r} was created with other settings ({', '.join(differ)} differ), so its trials are not "
                f"comparable; run with the original settings{how} or use another --study name"
            )
        was = {k: stored.get(k, False) for k in EDIT_VARIANTS if stored.get(k, False) != self.settings[k]}
        if was:
            raise UserError(
                f"study {name!r} was run with {', '.join(f'{k}={v}' for k, v in was.items())}; the same parameters would "
                f"edit the model differently now: resume it {', '.join(_asked_for(k, v) for k, v in was.items())} "
                "or use another --study name"
            )
        changed = [k for k in OBJECTIVE_VARIANTS if stored.get(k, 0.0) != self.settings[k]]
        if changed:
            flags = ", ".join(_asked_for(k, stored.get(k, 0.0)) for k in changed)
            raise UserError(
                f"study {name!r} was run {flags}, which decides which of its trials count; resume it with that "
                "or use another --study name"
            )


def _asked_for(name: str, value: bool | float) -> str:
    """How to ask for setting `name` = `value` again: "with --flag", "without --flag", "with --flag 0.99"."""
    return bool_flag_for(name, value) if isinstance(value, bool) else f"with {flag_of(name)} {value:g}"


def _stored_comparable(attrs: dict[str, Any]) -> dict[str, Any]:
    """The comparable settings a study was run with: from its run settings, or from the `settings`
    record that studies made before this module stored."""
    run = attrs.get("run_settings")
    if run is None:
        return dict(attrs.get("settings", {}))
    try:
        return comparable_settings(settings_from_record(run))
    except UserError:  # a record this version cannot rebuild: compare what it holds
        return dict(attrs.get("settings", {}))
