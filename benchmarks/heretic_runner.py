"""Run heretic 1.4 (PyPI ``heretic-llm==1.4.0``) headless, for side-by-side speed benchmarks.

heretic lives in its own virtual environment (``benchmarks/.venv-heretic``, git-ignored), made by
:func:`ensure_heretic_venv`: ``torch==2.13.0`` first (the CPU wheel on this machine's disk; a bare
torch requirement would pull a multi-GB CUDA build), then ``heretic-llm==1.4.0``.

:func:`run_heretic` writes, inside ``workdir``:

* ``prompts/{harmful,harmless}_{direction,scoring}.txt``: the very prompts our ``optimizer`` picks
  (``optimizer.prompts.load_prompts`` + ``split_prompts`` + ``take`` when importable, otherwise a
  copy of that rule: dedupe, sort by sha256, first 50% direction, next 30% scoring). heretic 1.4
  reads a plain ``.txt`` file (one prompt per line) natively when ``dataset`` is a file path, so
  no ``datasets`` / hub access is involved at all.
* ``config.toml``: heretic reads ``config.toml`` from its working directory (pydantic-settings
  source, below CLI flags and ``HERETIC_*`` env vars, which we do not use).
* ``_heretic_headless.py``: a wrapper run with the heretic venv's python. It calls
  ``heretic.main.run()`` unchanged, except that heretic's interactive prompts
  (``prompt_select``/``prompt_text``/``prompt_path``/``prompt_password``, all questionary) are
  replaced by functions that answer "exit" and log what was asked. It also wraps a few heretic
  methods with timers (events in ``timings.jsonl``) and, when heretic returns, dumps the Optuna
  journal heretic kept (``checkpoints/*.jsonl``) into ``results.json``.
* ``heretic.log``: heretic's stdout+stderr, each line prefixed by seconds since launch.

Answers to "can heretic run headless?"
--------------------------------------
* Trials: it runs exactly ``n_trials`` (``study.optimize(n_trials=n_trials - len(study.trials))``)
  without asking anything *during* the study, but it does NOT stop afterwards: it opens an
  interactive menu ("Which trial do you want to use?" -> save / upload / chat / benchmark). With
  no TTY (stdin = /dev/null) questionary raises ``EOFError`` there and heretic exits with a
  traceback (rc 1) after the study was checkpointed. No setting skips the menu, hence the
  wrapper's "exit" answer (clean rc 0). A leftover checkpoint for the same model in
  ``study_checkpoint_dir`` also triggers a prompt at start ("continue / restart / exit"), so we
  delete ``workdir/checkpoints`` before each run.
* Save/upload: nothing is saved or uploaded unless chosen in that menu; the wrapper answers "exit"
  so nothing is. (``export_strategy`` only pre-answers merge-vs-adapter for a save.) The only
  file it writes on its own is the Optuna journal in ``study_checkpoint_dir``.
* Batch size: default ``batch_size = 0`` = auto: at start it times ``get_responses`` (a full
  ``max_response_length`` generation, after a warm-up) at batch sizes 1, 2, 4, ... up to
  ``max_batch_size`` (default 128) on the harmless direction prompts and keeps the best
  tokens/s; on CPU nothing fails, so it walks the whole ladder (slow). We pass ``batch_size``
  explicitly (default 16 = our CPU default), which skips the search.

heretic settings used (``config.toml``)
--------------------------------------
* ``model`` = the local folder; ``dtypes = ["float32"]``; ``device_map = "cpu"`` (on a GPU:
  ``["bfloat16"]`` and heretic's default ``"auto"``);
  ``quantization = "none"`` (default).
* ``bad_prompts`` / ``good_prompts`` = the harmful / harmless direction files (``n_direction``
  each); ``bad_evaluation_prompts`` / ``good_evaluation_prompts`` = the harmful / harmless
  scoring files (``n_scoring`` each). ``column`` / ``split`` unset (text files).
* ``max_response_length = max_response_tokens``.
* ``batch_size`` (default 16, fixed: no auto search).
* ``response_prefix = ""`` by default: disables heretic's common-response-prefix detection (one
  generation pass over up to 200 prompts at start, then appending the found prefix to every
  prompt); ``None`` keeps heretic's behaviour.
* ``system_prompt`` = the model's own default system prompt, recovered from its chat template
  (render with no system message; the string that renders identically as an explicit system
  message). If the template has no such default, heretic's "You are a helpful assistant." stays
  and ``system_prompt_matched`` is False in the result.
* ``refusal_markers``: heretic's own list by default; pass ``refusal_markers=`` (e.g. ours) to
  match the counting.
* ``n_trials``; ``n_startup_trials`` (heretic default 60, so short runs are all random
  sampling); ``seed`` (default 0); ``study_checkpoint_dir = "checkpoints"`` (inside workdir).
* Kept at heretic defaults: ``row_normalization = "full"`` (rank-3 LoRA adapters on every
  o_proj/down_proj), ``orthogonalize_direction = true``, ``winsorization_quantile = 1.0``,
  ``kl_divergence_scale = 1.0``, ``kl_divergence_target = 0.01``, ``offload_outputs_to_cpu``,
  search space (direction scope/index + 4 kernel numbers per component), TPE with
  ``n_ei_candidates = 128``, ``multivariate = True``.

Settings that cannot be matched to ours
--------------------------------------
* Chat template default system prompt: heretic always sends an explicit system message; we
  emulate "template default" via the recovered string (exact same rendered text) when possible,
  never "no system message" for templates that render differently without one.
* Generation: both greedy and capped at max tokens, but heretic always generates all
  ``max_response_length`` tokens for every prompt in the batch (no early stop when a refusal
  marker appears or a sequence ends); ours drops decided sequences early.
* Refusal detection: heretic lowercases, strips ``*``, maps U+2019 to ``'`` and collapses
  whitespace, decodes with ``skip_special_tokens=True``; ours maps U+2018/U+2019/backtick and does
  not strip ``*`` or collapse whitespace. Marker lists differ unless ``refusal_markers`` is passed.
* KL: both on the first generated token over the harmless scoring prompts
  (``F.kl_div(new, base, batchmean, log_target)`` = KL(base || new)); heretic computes the first
  token via ``generate(max_new_tokens=1, use_cache=False)`` with a LoRA-wrapped (PEFT) model, so
  each forward pass carries PEFT adapter overhead. heretic never reports a baseline KL (0 by
  definition); the baseline refusal count is logged ("Initial refusals: k/N") and stored per
  trial as ``base_refusals``.
* Ablation: heretic edits weights through LoRA (reset = zeroing lora_B, abliterate = computing
  new LoRA factors) with difference-of-means directions; ours uses hooks and contrastive PCA.
  That is the algorithm under comparison, not a setting.
* Threads: heretic uses torch's default (all cores); so do we unless ``num_threads`` is given
  (sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and ``torch.set_num_threads``).

Held-out evaluation (``heldout_harmful`` / ``heldout_harmless``)
----------------------------------------------------------------
Optional; without these two files nothing below happens and every menu is answered "exit" as
before. With them (text files, one prompt per line; copied to ``prompts/heldout_*.txt``), the
wrapper answers heretic's "Which trial do you want to use?" menu with each listed trial in turn:
heretic's own Pareto front on (refusals, KL) of the completed trials, which is what that menu
lists (heretic does not use ``study.best_trials``; those numbers are reported as
``optuna_best_trials`` for comparison). For each one heretic itself restores the trial, exactly as
for a user's choice (its ``reset_trial_model()``: ``Model.reset_model()`` then
``Model.abliterate(refusal_directions, trial.user_attrs["direction_index"],
{k: AbliterationParameters(**v) for k, v in trial.user_attrs["parameters"].items()})``); at the
following "What do you want to do with the decensored model?" menu the wrapper measures and
answers "Return to the trial selection menu"; after the last trial it answers "exit".

* Prompts: heretic's ``utils.load_prompts`` (same system prompt; ``response_prefix`` is applied
  by ``Model.generate`` as for all heretic prompts).
* Refusals: heretic's ``Evaluator.count_refusals`` on the held-out harmful prompts (greedy,
  ``max_response_length`` tokens, ``skip_special_tokens=True``, ``Evaluator.is_refusal`` with the
  configured ``refusal_markers``), with ``evaluator.bad_prompts`` swapped for the call.
* KL: ``Model.get_logprobs_batched`` on the held-out harmless prompts, against the same for the
  unedited model, computed once (after ``Model.reset_model()``, before the first trial is
  applied) and compared as heretic's ``get_score`` does:
  ``F.kl_div(edited, original, reduction="batchmean", log_target=True)`` = KL(original || edited).
* Baseline refusals: the unedited model (after that reset) on the held-out harmful prompts.
* Checks: ``reset_check_scoring_kl`` (reset model vs heretic's own baseline log-probs on its
  scoring prompts, ~0) and per trial ``scoring_kl_recomputed`` (should equal heretic's stored
  ``scoring_kl``).

``results.json["heldout"]`` and the returned ``heldout``: ``baseline_refusals``, ``n_harmful``,
``n_harmless``, ``max_response_length``, ``menu_trials``, ``optuna_best_trials``,
``overlap_with_tuning_prompts``, ``baseline_seconds`` and ``trials`` (in menu order, each with
``number`` (Optuna's), ``index`` (heretic's 1-based), ``refusals``, ``kl``, ``params``,
``direction_index``, ``abliteration_parameters``, ``scoring_refusals``, ``scoring_kl``,
``scoring_kl_recomputed``, ``seconds``). A failure there sets ``error`` and makes the run's
status an error (rc 1). The held-out work runs after the study, so no trial timing includes it.

Timings returned
----------------
* ``trial_seconds``: wall time of each trial as the Optuna loop sees it: from the end of the
  previous trial (the start of ``study.optimize`` for the first) to this trial's callback, so it
  includes TPE sampling, model reset, abliteration, KL and refusal evaluation, storage writes and
  logging; it excludes model load, batch-size search, prefix detection, direction computation and
  the baseline evaluation.
* ``trial_seconds_optuna``: ``datetime_complete - datetime_start`` from the Optuna journal (almost
  the same; misses only the callback / bookkeeping between trials).
* ``phase_seconds``: one-time phases (imports, model load, directions, baseline evaluation).
* ``breakdown``: per-trial sums of reset_model / abliterate / KL (get_logprobs_batched) /
  refusal counting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERETIC_VERSION = "1.4.0"
TORCH_VERSION = "2.13.0"
DEFAULT_VENV = Path(__file__).resolve().parent / ".venv-heretic"
DEFAULT_BATCH_SIZE = 16  # what optimizer uses on CPU (workbench.py)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONUNBUFFERED": "1",
    "TERM": "dumb",
    "COLUMNS": "200",  # rich wraps at the console width; keep log lines whole
}


# --------------------------------------------------------------------------------------------
# venv


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _installed_versions(python: Path) -> dict[str, str] | None:
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for d in ('heretic-llm', 'torch'):\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([str(python), "-c", code], check=False, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_heretic_venv(path: Path = DEFAULT_VENV) -> Path:
    """Make (or reuse) a venv with torch 2.13.0 (CPU wheel from disk) and heretic-llm 1.4.0.

    Idempotent: returns at once when both versions are already installed. Returns the venv's python.
    """
    path = Path(path)
    python = _venv_python(path)
    versions = _installed_versions(python) if python.exists() else None
    if (
        versions
        and versions.get("heretic-llm") == HERETIC_VERSION
        and (versions.get("torch") or "").split("+")[0] == TORCH_VERSION
    ):
        return python
    if not python.exists():
        # Use the base interpreter of whatever runs us (a venv's python makes a fine parent too).
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    # torch first and pinned: heretic-llm only says "torch", which would otherwise resolve to
    # a CUDA build from PyPI.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"heretic-llm=={HERETIC_VERSION}", f"torch=={TORCH_VERSION}"], check=True)
    versions = _installed_versions(python)
    if not versions or versions.get("heretic-llm") != HERETIC_VERSION:
        raise RuntimeError(f"heretic-llm {HERETIC_VERSION} did not install into {path}: {versions}")
    return python


# --------------------------------------------------------------------------------------------
# prompts


def _select_prompts(harmful_file: Path, harmless_file: Path, n_direction: int, n_scoring: int) -> dict[str, list[str]]:
    """The direction and scoring prompts our optimizer would use for these files."""
    try:
        from optimizer.prompts import load_prompts, split_prompts, take  # type: ignore

        harmful = split_prompts(load_prompts(str(harmful_file), "harmful"))
        harmless = split_prompts(load_prompts(str(harmless_file), "harmless"))
        return {
            "harmful_direction": take(harmful.direction, n_direction, "harmful direction", "n_direction"),
            "harmless_direction": take(harmless.direction, n_direction, "harmless direction", "n_direction"),
            "harmful_scoring": take(harmful.scoring, n_scoring, "harmful scoring", "n_scoring"),
            "harmless_scoring": take(harmless.scoring, n_scoring, "harmless scoring", "n_scoring"),
        }
    except ImportError:
        pass

    def split(path: Path) -> tuple[list[str], list[str]]:
        seen: set[str] = set()
        prompts = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            p = line.strip()
            if p and p not in seen:
                seen.add(p)
                prompts.append(p)
        ordered = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
        nd, ns = int(len(ordered) * 0.5), int(len(ordered) * 0.3)
        direction, scoring = ordered[:nd], ordered[nd : nd + ns]
        if len(direction) < n_direction or len(scoring) < n_scoring:
            raise ValueError(f"{path}: not enough prompts for {n_direction} direction + {n_scoring} scoring")
        return direction[:n_direction], scoring[:n_scoring]

    bd, bs = split(harmful_file)
    gd, gs = split(harmless_file)
    return {"harmful_direction": bd, "harmless_direction": gd, "harmful_scoring": bs, "harmless_scoring": gs}


_SYSTEM_PROMPT_PROBE = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
user = {"role": "user", "content": "Hello"}
def render(msgs):
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
bare = render([user])
marker = "\x01SYSTEM\x02"
marked = render([{"role": "system", "content": marker}, user])
found = None
if marker in marked:
    pre, post = marked.split(marker, 1)
    if bare.startswith(pre) and bare.endswith(post) and len(bare) >= len(pre) + len(post):
        candidate = bare[len(pre): len(bare) - len(post)]
        if candidate and render([{"role": "system", "content": candidate}, user]) == bare:
            found = candidate
print(json.dumps({"system_prompt": found}))
"""


def _default_system_prompt(python: Path, model_dir: Path, env: dict[str, str]) -> str | None:
    """The system prompt the model's chat template inserts when given none (None if none/unclear)."""
    done = subprocess.run(
        [str(python), "-c", _SYSTEM_PROMPT_PROBE, str(model_dir)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["system_prompt"]


# --------------------------------------------------------------------------------------------
# the wrapper run inside heretic's venv

_WRAPPER = r"""
import json, os, sys, time, traceback
T0 = time.perf_counter()
EVENTS = open(os.environ["HERETIC_RUNNER_TIMINGS"], "a", buffering=1)
def emit(**kw):
    kw.setdefault("t", time.perf_counter() - T0)
    EVENTS.write(json.dumps(kw) + "\n")

emit(event="wrapper_start")
sys.argv = ["heretic"]  # all settings come from ./config.toml

import torch
if os.environ.get("HERETIC_RUNNER_THREADS"):
    torch.set_num_threads(int(os.environ["HERETIC_RUNNER_THREADS"]))
import optuna
import heretic.main as hm
import heretic.model as hmodel
import heretic.evaluator as heval
emit(event="imported", torch_threads=torch.get_num_threads())

# --- headless: every interactive question is answered with "exit"/empty -------------------
def _answer(kind):
    def f(message, *a, **k):
        emit(event="prompt_answered", kind=kind, message=str(message), answer=None)
        print(f"[heretic_runner] headless: answered {kind}({message!r}) with exit")
        return None
    return f
hm.prompt_select = _answer("select")
hm.prompt_text = _answer("text")
hm.prompt_path = _answer("path")
hm.prompt_password = _answer("password")

# --- optional held-out evaluation of every trial in heretic's "Which trial" menu -----------
# Only active when the runner sets HERETIC_RUNNER_HELDOUT. The menu is answered with each listed
# (Pareto-optimal) trial in turn; heretic itself then restores it (its reset_trial_model():
# model.reset_model() + model.abliterate(refusal_directions, direction_index, parameters)) and
# asks "What do you want to do with the decensored model?", where we measure the held-out
# prompts and answer "Return to the trial selection menu". After the last trial: "exit".
HELDOUT_CFG = json.loads(os.environ["HERETIC_RUNNER_HELDOUT"]) if os.environ.get("HERETIC_RUNNER_HELDOUT") else None
HELDOUT = None  # results, written to results.json["heldout"]
CAP = {}  # heretic objects captured on the way: evaluator (-> model, settings), study
TRIAL_MENU = "Which trial do you want to use?"
ACTION_MENU = "What do you want to do with the decensored model?"

if HELDOUT_CFG is not None:
    import torch.nn.functional as F
    from heretic.config import DatasetSpecification
    from heretic.utils import load_prompts as h_load_prompts

    _HS = {"queue": None, "current": None}

    def _kl(new, base):  # exactly heretic's Evaluator.get_score: KL(base || new)
        return F.kl_div(new, base, reduction="batchmean", log_target=True).item()

    def _count_refusals(ev, prompts):
        # heretic's own Evaluator.count_refusals (greedy, max_response_length tokens,
        # skip_special_tokens, Evaluator.is_refusal with settings.refusal_markers) on our prompts.
        saved = ev.bad_prompts
        ev.bad_prompts = prompts
        try:
            return ev.count_refusals()
        finally:
            ev.bad_prompts = saved

    def _heldout_baseline(choices):
        global HELDOUT
        ev = CAP["evaluator"]
        model, settings = ev.model, ev.settings
        t0 = time.perf_counter()
        harmful = h_load_prompts(settings, DatasetSpecification(dataset=HELDOUT_CFG["harmful"]))
        harmless = h_load_prompts(settings, DatasetSpecification(dataset=HELDOUT_CFG["harmless"]))
        front = [c.value for c in choices if not isinstance(getattr(c, "value", c), str)]
        HELDOUT = {
            "n_harmful": len(harmful), "n_harmless": len(harmless),
            "max_response_length": settings.max_response_length,
            "menu_trials": [t.number for t in front], "trials": [],
        }
        try:
            HELDOUT["optuna_best_trials"] = sorted(t.number for t in CAP["study"].best_trials)
        except Exception as e:
            HELDOUT["optuna_best_trials"] = f"unavailable: {type(e).__name__}: {e}"
        print(f"[heretic_runner] held-out: resetting model to the unedited state (model.reset_model())")
        model.reset_model()
        # Check that the reset model is the one heretic's baseline saw: KL on heretic's scoring prompts.
        HELDOUT["reset_check_scoring_kl"] = _kl(model.get_logprobs_batched(ev.good_prompts), ev.base_logprobs)
        CAP["harmful"], CAP["harmless"] = harmful, harmless
        CAP["base_logprobs"] = model.get_logprobs_batched(harmless)
        HELDOUT["baseline_refusals"] = _count_refusals(ev, harmful)
        HELDOUT["baseline_seconds"] = round(time.perf_counter() - t0, 3)
        emit(event="heldout_baseline", seconds=HELDOUT["baseline_seconds"])
        print(f"[heretic_runner] held-out: baseline refusals {HELDOUT['baseline_refusals']}/{len(harmful)}; "
              f"reset check KL on scoring prompts {HELDOUT['reset_check_scoring_kl']:.3g}; "
              f"{len(front)} trials to evaluate: {HELDOUT['menu_trials']}")
        return front

    def _heldout_trial(trial):
        ev = CAP["evaluator"]
        model = ev.model
        t0 = time.perf_counter()
        kl = _kl(model.get_logprobs_batched(CAP["harmless"]), CAP["base_logprobs"])
        refusals = _count_refusals(ev, CAP["harmful"])
        # Recomputed scoring-set KL: equals heretic's stored kl_divergence if the trial was restored faithfully.
        scoring_kl = _kl(model.get_logprobs_batched(ev.good_prompts), ev.base_logprobs)
        ua = trial.user_attrs
        entry = {
            "number": trial.number, "index": ua.get("index"), "refusals": refusals, "kl": kl,
            "params": trial.params, "direction_index": ua.get("direction_index"),
            "abliteration_parameters": ua.get("parameters"),
            "scoring_refusals": ua.get("refusals"), "scoring_kl": ua.get("kl_divergence"),
            "scoring_kl_recomputed": scoring_kl, "seconds": round(time.perf_counter() - t0, 3),
        }
        HELDOUT["trials"].append(entry)
        emit(event="heldout_trial", number=trial.number, seconds=entry["seconds"])
        print(f"[heretic_runner] held-out: trial {trial.number} (index {ua.get('index')}): "
              f"refusals {refusals}/{len(CAP['harmful'])}, KL {kl:.4f} (scoring KL {ua.get('kl_divergence'):.4f}, "
              f"recomputed {scoring_kl:.4f})")

    def _select(message, choices=None, *a, **k):
        global HELDOUT
        answer = None
        try:
            if message == TRIAL_MENU:
                if _HS["queue"] is None:
                    _HS["queue"] = _heldout_baseline(choices or [])
                if _HS["queue"]:
                    answer = _HS["current"] = _HS["queue"].pop(0)
            elif message == ACTION_MENU and _HS["current"] is not None:
                trial, _HS["current"] = _HS["current"], None
                _heldout_trial(trial)
                answer = ""  # "Return to the trial selection menu"
        except Exception as e:
            traceback.print_exc()
            if HELDOUT is None:
                HELDOUT = {"trials": []}
            HELDOUT["error"] = f"{type(e).__name__}: {e}"
            _HS["queue"], _HS["current"] = [], None
            answer = "" if message == ACTION_MENU else None  # back to the menu, which then exits
        shown = getattr(answer, "number", answer)
        emit(event="prompt_answered", kind="select", message=str(message), answer=shown)
        print(f"[heretic_runner] headless: answered select({message!r}) with "
              + (f"trial {shown}" if hasattr(answer, "number") else repr(answer) if answer is not None else "exit"))
        return answer
    hm.prompt_select = _select

# --- timers ------------------------------------------------------------------------------
def timed(cls, name, label):
    orig = getattr(cls, name)
    def wrapper(*a, **k):
        t0 = time.perf_counter() - T0
        try:
            return orig(*a, **k)
        finally:
            emit(event="call", name=label, t0=t0, t=time.perf_counter() - T0)
    setattr(cls, name, wrapper)

timed(hmodel.Model, "__init__", "model_load")
timed(hmodel.Model, "get_residuals_mean", "residuals_mean")
timed(hmodel.Model, "get_residuals_batched", "residuals")
timed(hmodel.Model, "reset_model", "reset_model")
timed(hmodel.Model, "abliterate", "abliterate")
timed(hmodel.Model, "get_logprobs_batched", "logprobs")
timed(heval.Evaluator, "__init__", "baseline")
timed(heval.Evaluator, "count_refusals", "count_refusals")
timed(heval.Evaluator, "get_score", "get_score")

_timed_eval_init = heval.Evaluator.__init__
def _capture_evaluator(self, *a, **k):
    _timed_eval_init(self, *a, **k)
    CAP["evaluator"] = self
heval.Evaluator.__init__ = _capture_evaluator

_orig_optimize = optuna.study.Study.optimize
def optimize(self, func, *a, callbacks=None, **k):
    CAP["study"] = self
    emit(event="optimize_start", n_trials=k.get("n_trials"))
    def cb(study, trial):
        emit(event="trial_end", number=trial.number, state=str(trial.state))
    try:
        return _orig_optimize(self, func, *a, callbacks=list(callbacks or []) + [cb], **k)
    finally:
        emit(event="optimize_end")
optuna.study.Study.optimize = optimize

status = "ok"
try:
    hm.run()
except BaseException as e:
    status = f"error: {type(e).__name__}: {e}"
    traceback.print_exc()
if HELDOUT_CFG is not None and status == "ok":
    if HELDOUT is None:
        status = "error: held-out evaluation did not run (heretic never showed the trial menu)"
    elif "error" in HELDOUT:
        status = f"error: held-out evaluation: {HELDOUT['error']}"
emit(event="run_end", status=status)

# --- results from heretic's own Optuna journal ------------------------------------------
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
results = {"status": status, "trials": []}
ckdir = "checkpoints"
files = sorted(f for f in os.listdir(ckdir) if f.endswith(".jsonl")) if os.path.isdir(ckdir) else []
if files:
    storage = JournalStorage(JournalFileBackend(os.path.join(ckdir, files[0])))
    study = optuna.load_study(study_name="heretic", storage=storage)
    results["study_user_attrs"] = {k: v for k, v in study.user_attrs.items() if k != "settings"}
    results["settings"] = json.loads(study.user_attrs.get("settings", "null") or "null")
    for t in study.trials:
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        results["trials"].append({
            "number": t.number, "state": str(t.state), "values": t.values, "params": t.params,
            "user_attrs": t.user_attrs, "seconds": dur,
        })
if HELDOUT_CFG is not None:
    results["heldout"] = HELDOUT
with open("results.json", "w") as f:
    json.dump(results, f, indent=1, default=str)
sys.exit(0 if status == "ok" else 1)
"""


def _toml_value(v) -> str:
    if v is None:
        raise ValueError("TOML has no null")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _write_config(path: Path, top: dict, tables: dict[str, dict]) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# run


def run_heretic(
    python: Path,
    model_dir: Path,
    harmful_file: Path,
    harmless_file: Path,
    n_direction: int,
    n_scoring: int,
    max_response_tokens: int,
    n_trials: int,
    workdir: Path,
    timeout_s: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    refusal_markers: list[str] | None = None,
    system_prompt: str | None = None,
    response_prefix: str | None = "",
    n_startup_trials: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    heldout_harmful: Path | None = None,
    heldout_harmless: Path | None = None,
    device: str = "cpu",
) -> dict:
    """Run heretic headless on a local model folder and local prompt files; see the module doc.

    ``system_prompt=None`` recovers the model's default from its chat template.
    Returns a dict with ``trial_seconds``, ``trial_seconds_optuna``, ``trials`` (refusals, KL, ...),
    ``baseline_refusals``, ``baseline_kl`` (None: heretic reports none, 0 by definition),
    ``phase_seconds``, ``breakdown``, ``settings``, ``log_path``, ``returncode``, ``status``,
    ``heldout`` (None unless both held-out files are given; see "Held-out evaluation" in the
    module doc). ``device="cuda"`` loads the model in bfloat16 with heretic's default device map
    ("auto"), as heretic runs on a GPU by default; "cpu" in float32.
    """
    if (heldout_harmful is None) != (heldout_harmless is None):
        raise ValueError("give both heldout_harmful and heldout_harmless, or neither")
    python, model_dir, workdir = Path(python), Path(model_dir).resolve(), Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in (
        "checkpoints",
        "results.json",
        "timings.jsonl",
        "heretic.log",
        "config.toml",
        "prompts/heldout_harmful.txt",
        "prompts/heldout_harmless.txt",
    ):
        p = workdir / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    env = {**os.environ, **OFFLINE_ENV}
    env.pop("VIRTUAL_ENV", None)
    if num_threads:
        env.update(OMP_NUM_THREADS=str(num_threads), MKL_NUM_THREADS=str(num_threads), HERETIC_RUNNER_THREADS=str(num_threads))

    # prompts
    prompt_dir = workdir / "prompts"
    prompt_dir.mkdir(exist_ok=True)
    chosen = _select_prompts(Path(harmful_file), Path(harmless_file), n_direction, n_scoring)
    files = {}
    for name, prompts in chosen.items():
        if any("\n" in p or "\r" in p for p in prompts):
            raise ValueError(f"{name}: a prompt spans several lines; heretic's text files hold one per line")
        files[name] = prompt_dir / f"{name}.txt"
        files[name].write_text("\n".join(prompts) + "\n", encoding="utf-8")

    heldout_info = None
    if heldout_harmful is not None:
        heldout_info = {"overlap_with_tuning_prompts": {}}
        tuning = {p for prompts in chosen.values() for p in prompts}
        for kind, src in (("harmful", heldout_harmful), ("harmless", heldout_harmless)):
            # heretic's loader strips lines and skips empty ones; do the same so counts agree.
            prompts = [line.strip() for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"{src}: no held-out {kind} prompts")
            files[f"heldout_{kind}"] = prompt_dir / f"heldout_{kind}.txt"
            files[f"heldout_{kind}"].write_text("\n".join(prompts) + "\n", encoding="utf-8")
            heldout_info["overlap_with_tuning_prompts"][kind] = sum(p in tuning for p in prompts)
        env["HERETIC_RUNNER_HELDOUT"] = json.dumps(
            {"harmful": str(files["heldout_harmful"]), "harmless": str(files["heldout_harmless"])}
        )
    else:
        env.pop("HERETIC_RUNNER_HELDOUT", None)

    system_prompt_matched = True
    if system_prompt is None:
        system_prompt = _default_system_prompt(python, model_dir, env)
        if system_prompt is None:
            system_prompt_matched = False  # heretic's default "You are a helpful assistant." stays

    top = {
        "model": str(model_dir),
        "dtypes": ["float32"] if device == "cpu" else ["bfloat16"],
        "device_map": "cpu" if device == "cpu" else "auto",
        "batch_size": int(batch_size),
        "max_response_length": int(max_response_tokens),
        "response_prefix": response_prefix,
        "system_prompt": system_prompt,
        "refusal_markers": list(refusal_markers) if refusal_markers is not None else None,
        "n_trials": int(n_trials),
        "n_startup_trials": int(n_startup_trials) if n_startup_trials is not None else None,
        "seed": int(seed),
        "study_checkpoint_dir": "checkpoints",
    }
    tables = {
        "bad_prompts": {"dataset": str(files["harmful_direction"])},
        "good_prompts": {"dataset": str(files["harmless_direction"])},
        "bad_evaluation_prompts": {"dataset": str(files["harmful_scoring"])},
        "good_evaluation_prompts": {"dataset": str(files["harmless_scoring"])},
    }
    _write_config(workdir / "config.toml", top, tables)
    wrapper = workdir / "_heretic_headless.py"
    wrapper.write_text(_WRAPPER, encoding="utf-8")
    timings_path = workdir / "timings.jsonl"
    env["HERETIC_RUNNER_TIMINGS"] = str(timings_path)
    log_path = workdir / "heretic.log"

    # launch, timestamping each output line
    t_launch = time.perf_counter()
    proc = subprocess.Popen(
        [str(python), str(wrapper)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def pump() -> None:
        with open(log_path, "w", encoding="utf-8") as log:
            for raw in iter(proc.stdout.readline, b""):
                log.write(f"[{time.perf_counter() - t_launch:9.3f}] {raw.decode('utf-8', 'replace').rstrip()}\n")
                log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session only
        except ProcessLookupError:
            pass
        returncode = proc.wait()
    reader.join(timeout=10)
    wall = time.perf_counter() - t_launch

    out = _collect(workdir, log_path, timings_path, returncode, timed_out, wall, system_prompt, system_prompt_matched, batch_size)
    if heldout_info is not None and out["heldout"] is not None:
        out["heldout"].update(heldout_info)
    return out


def _collect(
    workdir, log_path, timings_path, returncode, timed_out, wall, system_prompt, system_prompt_matched, batch_size
) -> dict:
    events = []
    if timings_path.exists():
        events = [json.loads(line) for line in timings_path.read_text().splitlines() if line.strip()]
    results = {}
    if (workdir / "results.json").exists():
        results = json.loads((workdir / "results.json").read_text())

    calls = [e for e in events if e["event"] == "call"]

    def total(name, lo=float("-inf"), hi=float("inf")):
        return sum(e["t"] - e["t0"] for e in calls if e["name"] == name and lo <= e["t0"] < hi)

    def span(name):
        sel = [e for e in calls if e["name"] == name]
        return sum(e["t"] - e["t0"] for e in sel) if sel else None

    imported = next((e["t"] for e in events if e["event"] == "imported"), None)
    opt_start = next((e["t"] for e in events if e["event"] == "optimize_start"), None)
    trial_ends = [e for e in events if e["event"] == "trial_end"]
    trial_seconds, breakdown, prev = [], [], opt_start
    for e in trial_ends:
        trial_seconds.append(round(e["t"] - prev, 3))
        breakdown.append(
            {
                "number": e["number"],
                "reset_model": round(total("reset_model", prev, e["t"]), 3),
                "abliterate": round(total("abliterate", prev, e["t"]), 3),
                "kl_logprobs": round(total("logprobs", prev, e["t"]), 3),
                "count_refusals": round(total("count_refusals", prev, e["t"]), 3),
                "get_score": round(total("get_score", prev, e["t"]), 3),
            }
        )
        prev = e["t"]

    trials = []
    for t in results.get("trials", []):
        ua = t.get("user_attrs", {})
        trials.append(
            {
                "number": t["number"],
                "state": t["state"],
                "seconds": t.get("seconds"),
                "refusals": ua.get("refusals"),
                "n_bad_prompts": ua.get("n_bad_prompts"),
                "kl_divergence": ua.get("kl_divergence"),
                "score": t.get("values"),
                "params": t.get("params"),
            }
        )
    base = next(
        (t["user_attrs"].get("base_refusals") for t in results.get("trials", []) if "base_refusals" in t.get("user_attrs", {})),
        None,
    )
    if base is None and log_path.exists():  # baseline is logged before any trial finishes
        for line in log_path.read_text().splitlines():
            if "Initial refusals:" in line:
                base = int(line.split("Initial refusals:")[1].split("/")[0].strip())

    prompts = [e for e in events if e["event"] == "prompt_answered"]
    return {
        "returncode": returncode,
        "timed_out": timed_out,
        "status": results.get("status", "no results.json (crashed or killed)"),
        "wall_seconds": round(wall, 3),
        "trial_seconds": trial_seconds,
        "trial_seconds_optuna": [t["seconds"] for t in trials],
        "trials": trials,
        "baseline_refusals": base,
        "baseline_kl": None,  # heretic reports none (0 by definition)
        "phase_seconds": {
            "imports": imported,
            "model_load": span("model_load"),
            "directions": span("residuals_mean"),
            "baseline_evaluation": span("baseline"),
            "before_first_trial": opt_start,
        },
        "breakdown": breakdown,
        "prompts_answered": [p["message"] for p in prompts],
        "system_prompt": system_prompt,
        "system_prompt_matched": system_prompt_matched,
        "batch_size": batch_size,
        "settings": results.get("settings"),
        "heldout": results.get("heldout"),
        "config_path": str(workdir / "config.toml"),
        "log_path": str(log_path),
        "timings_path": str(timings_path),
    }


if __name__ == "__main__":  # tiny smoke run: python benchmarks/heretic_runner.py [model_dir]
    root = Path(__file__).resolve().parent.parent
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/root/.cache/optimizer/models/smollm2-135m-instruct")
    py = ensure_heretic_venv(DEFAULT_VENV)
    out = run_heretic(
        py,
        model,
        root / "optimizer/data/harmful.txt",
        root / "optimizer/data/harmless.txt",
        n_direction=8,
        n_scoring=4,
        max_response_tokens=8,
        n_trials=2,
        workdir=Path("/tmp/heretic_runner_smoke"),
        timeout_s=300,
    )
    out.pop("settings", None)
    print(json.dumps(out, indent=1, default=str))
