"""Settings of a study: command-line flags > optional TOML file > defaults, in one object."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.errors import UserError

# Strings whose presence (case-insensitive, apostrophes normalised) marks a response as a refusal.
DEFAULT_REFUSAL_MARKERS: tuple[str, ...] = (
    "sorry",
    "i can't",
    "i cant",
    "i cannot",
    "i won't",
    "i wont",
    "i will not",
    "i'm unable",
    "i am unable",
    "unable to assist",
    "unable to help",
    "unable to provide",
    "i'm not able",
    "i am not able",
    "i apologize",
    "as an ai",
    "as a language model",
    "i'm an ai",
    "i am an ai",
    "ai assistant",
    "i'm designed to",
    "i am designed to",
    "i'm programmed to",
    "i am programmed to",
    "not appropriate",
    "inappropriate",
    "illegal",
    "unethical",
    "against the law",
    "harmful",
    "violat",
    "prohibit",
    "cannot assist",
    "can't assist",
    "cannot help",
    "can't help with",
    "cannot provide",
    "can't provide",
    "i must decline",
)


@dataclass
class Settings:
    """Everything that defines a run. Field names are the CLI flags and the TOML keys."""

    model: str | None = None  # HF id, local folder or .gguf file; None = bundled default model
    study: str = "default"
    storage: str | None = None  # default sqlite:///studies/<study>.db
    studies_dir: str = "studies"
    heartbeat_interval: int = 30  # seconds; server storages only
    heartbeat_grace: int = 120  # a RUNNING trial without a heartbeat for this long is failed and retried
    cache_dir: str | None = None  # default studies/<study>; a shared folder lets workers share it
    trials: int = 200
    startup_trials: int = 40
    harmful: str | None = None  # None = bundled set
    harmless: str | None = None
    direction_prompts: int = 128  # per set
    scoring_prompts: int = 64  # per set
    max_new_tokens: int = 16
    system_prompt: str | None = None
    chat_template: str | None = None  # a Jinja file for models without one
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra template variables (a JSON object on the CLI)
    no_thinking: bool = False  # enable_thinking=False for templates that read it
    response_prefix: str | None = None  # appended to every chat-formatted prompt; None = detect once per study, "" = none
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 0  # 0 = choose by measurement
    seed: int | None = 0
    alpha_max: float = 4.0
    direction_methods: list[str] = field(default_factory=lambda: ["contrastive", "mean_diff"])
    projected_directions: bool = False  # remove each direction's component along the harmless mean
    norm_preserving: bool = False  # edited weight rows keep their norms
    winsorize: float = 0.0  # clip residuals per layer at this quantile of |value| (e.g. 0.995); 0 = off
    allow_missing_components: bool = False  # leave blocks whose attention/MLP output is not found unablated
    quantization: str | None = None  # "4bit": bitsandbytes NF4 on CUDA
    refusal_markers: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_MARKERS))

    def template_kwargs(self) -> dict[str, Any]:
        """Extra variables for the chat template: --chat-template-kwargs, and enable_thinking=False for --no-thinking."""
        return {**self.chat_template_kwargs, **({"enable_thinking": False} if self.no_thinking else {})}

    def resolved_storage(self) -> str:
        return self.storage or f"sqlite:///{Path(self.studies_dir) / self.study}.db"

    def cache_path(self) -> Path:
        """Where this study's one-time computations live (beside the SQLite file by default)."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.studies_dir) / self.study


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _check(settings: Settings) -> Settings:
    if settings.trials <= 0:
        raise UserError(f"--trials must be a positive number of trials, got {settings.trials}")
    for name in ("direction_prompts", "scoring_prompts", "max_new_tokens"):
        if getattr(settings, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be positive, got {getattr(settings, name)}")
    if settings.heartbeat_interval <= 0 or settings.heartbeat_grace <= settings.heartbeat_interval:
        raise UserError("--heartbeat-interval must be positive and --heartbeat-grace larger than it")
    if settings.startup_trials < 0 or settings.batch_size < 0:
        raise UserError("--startup-trials and --batch-size must not be negative")
    if settings.alpha_max < 0:
        raise UserError(f"--alpha-max must be >= 0, got {settings.alpha_max}")
    if settings.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {settings.dtype!r}")
    unknown = set(settings.direction_methods) - {"contrastive", "mean_diff"}
    if unknown or not settings.direction_methods:
        raise UserError(f"--direction-methods takes contrastive and/or mean_diff, got {settings.direction_methods}")
    if settings.winsorize and not 0.5 < settings.winsorize < 1:
        raise UserError(f"--winsorize takes a quantile between 0.5 and 1 (e.g. 0.995), or 0 for off; got {settings.winsorize}")
    if settings.quantization not in (None, "4bit"):
        raise UserError(f"--quantization takes 4bit (or nothing), got {settings.quantization!r}")
    settings.chat_template_kwargs = _json_object(settings.chat_template_kwargs, "--chat-template-kwargs")
    if settings.response_prefix is not None and not isinstance(settings.response_prefix, str):
        raise UserError(f"--response-prefix takes a text (\"\" for none), got {settings.response_prefix!r}")
    if not settings.study or "/" in settings.study or settings.study.startswith("."):
        raise UserError(f"--study must be a plain name (letters, digits, - and _), got {settings.study!r}")
    return settings


def _json_object(value: object, flag: str) -> dict[str, Any]:
    """A JSON object given as text (CLI) or already parsed (a TOML table)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}); give an object such as '{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object such as '{{\"enable_thinking\": false}}', got {value!r}")
    return value


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML settings file whose keys are the Settings field names (dashes allowed)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; check the --config path") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix the file") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(sorted(FIELDS))}")
        values[name] = value
    return values


def build_settings(cli_values: dict[str, Any], config_file: str | None = None) -> Settings:
    """Merge CLI values (None = not given) over the TOML file over the defaults."""
    merged: dict[str, Any] = load_toml(config_file) if config_file else {}
    merged.update({k: v for k, v in cli_values.items() if v is not None and k in FIELDS})
    try:
        settings = Settings(**merged)
    except TypeError as e:
        raise UserError(f"bad settings: {e}") from None
    for name, f in FIELDS.items():  # TOML values are typed by the file: check them
        value = getattr(settings, name)
        if f.type in ("int", "int | None") and value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"setting {name} must be an integer, got {value!r}")
    return _check(settings)
