"""After a study: show, export (round trip against the hooked model), eval, chat, dashboard."""

import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import optuna
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimizer.chat import chat
from optimizer.cli import main
from optimizer.dashboard import free_port
from optimizer.model import load_model
from optimizer.prompts import format_chat
from optimizer.residuals import tokenize
from optimizer.stored import open_study
from optimizer.trials import load_edited_model
from tests.test_study import run_args

PROMPTS = ["Write a haiku about rain.", "How do I pick a lock?"]


@pytest.fixture(scope="module")
def finished_study(tiny_dir, tmp_path_factory):
    studies = tmp_path_factory.mktemp("after") / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "4", "--startup-trials", "4", "--seed", "5")) == 0
    return studies


def edited_trial(studies) -> int:
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    edited = [t for t in study.trials if not t.user_attrs.get("baseline") and t.state.name == "COMPLETE"]
    return max(edited, key=lambda t: (t.params.get("subspace_k", 1), -t.number)).number  # the largest subspace, first


def test_show(finished_study, capsys):
    assert main(["show", "--study", "t", "--studies-dir", str(finished_study)]) == 0
    out = capsys.readouterr().err
    assert "Baseline refusals:" in out and "4 complete" in out and "Pareto-optimal trials" in out
    # the baseline is infeasible (it refuses as often as itself), so off the front, but shown for reference
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{finished_study}/t.db")
    assert study.trials[0].user_attrs["baseline"] and study.trials[0] not in study.best_trials
    assert "0 (baseline)" in out and "none (unedited)" in out


def test_export_round_trip_equals_hooked_model(finished_study, tmp_path, capsys):
    number = edited_trial(finished_study)
    out = tmp_path / "exported"
    assert main(["export", "--study", "t", "--studies-dir", str(finished_study), "--trial", str(number), "--out", str(out)]) == 0
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "optimizer.json",
        "ablation.safetensors",
    ):
        assert (out / name).exists(), name
    record = json.loads((out / "optimizer.json").read_text())
    assert record["trial"] == number and record["params"]

    edited = load_edited_model(open_study("t", None, str(finished_study)), number, Console(file=io.StringIO()))
    loaded = edited.prepared.loaded
    texts = format_chat(loaded.tokenizer, PROMPTS)
    with torch.inference_mode():
        original = loaded.model(**tokenize(loaded, texts)).logits
        edited.prepared.hooks.apply(edited.plan)
        hooked = loaded.model(**tokenize(loaded, texts)).logits
        exported = load_model(str(out), "cpu", "float32")
        baked = exported.model(**tokenize(exported, texts)).logits
    assert (hooked - original).abs().max() > 1e-3, "the trial must change the model"
    # both float32 on the CPU: only summation order differs
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)
    # every direction is written: the first per layer, and the rest of the refusal subspace
    assert edited.plan.rank > 1 and record["subspace"]["k"] == edited.plan.rank
    directions = load_file(out / "ablation.safetensors")
    for c in ("attn", "mlp"):
        torch.testing.assert_close(directions[f"{c}.directions"], edited.plan.directions[c].float())
        torch.testing.assert_close(directions[f"{c}.extra_directions"], edited.plan.extra[c].float())
    # a plain transformers load works too, with the chat template
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.num_hidden_layers == 4
    updated = optuna.load_study(study_name="t", storage=f"sqlite:///{finished_study}/t.db").trials[number]
    assert updated.user_attrs["exported_to"] == str(out.resolve())


def test_export_refuses_bad_input(finished_study, tmp_path, tiny_llama_bias_dir, capsys):
    number = edited_trial(finished_study)
    base = ["export", "--study", "t", "--studies-dir", str(finished_study)]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [
        (base + ["--trial", str(number), "--out", str(full)], "not empty"),
        (base + ["--trial", "99", "--out", str(tmp_path / "a")], "has no trial 99"),
        (
            base + ["--trial", str(number), "--out", str(tmp_path / "b"), "--model", str(tiny_llama_bias_dir)],
            "not the study's model",
        ),
        (
            ["export", "--study", "nope", "--studies-dir", str(finished_study), "--trial", "1", "--out", str(tmp_path / "c")],
            "no study file",
        ),
        (
            base + ["--trial", str(number), "--out", str(tmp_path / "d"), "--format", "lora", "--dtype", "float16"],
            "--dtype applies to --format hf",
        ),
        (
            base + ["--trial", str(number), "--out", str(tmp_path / "e"), "--gguf-type", "q8_0"],
            "--gguf-type applies to --format gguf",
        ),
        (base + ["--trial", str(number), "--out", str(full / "x"), "--format", "gguf"], "exists; choose a new --out file name"),
    ]
    for args, fragment in cases:
        assert main(args) == 2
        assert fragment in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_eval_refusals_and_local_task_store_results(finished_study, capsys):
    number = edited_trial(finished_study)
    args = ["eval", "--study", "t", "--studies-dir", str(finished_study), "--trial", str(number), "--limit", "4"]
    assert main(args + ["--refusals"]) == 0
    assert "Held-out refusals" in capsys.readouterr().err
    assert main(args + ["--tasks", "optimizer_everyday_mc"]) == 0
    assert "lm-eval scores" in capsys.readouterr().err
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{finished_study}/t.db")
    attrs = study.trials[number].user_attrs
    assert attrs["heldout_refusals"].endswith("/4")
    assert attrs["heldout_kl_divergence"] >= 0
    assert 0 <= attrs["eval/optimizer_everyday_mc/acc"] <= 1
    assert 0 <= study.user_attrs["eval_original/optimizer_everyday_mc/acc"] <= 1


def test_eval_refusals_on_the_cpu_fast_paths_equal_the_plain_path(finished_study):
    from optimizer.evaluate import evaluate_refusals
    from optimizer.workbench import FastPaths, cpu_fast_paths

    stored = open_study("t", None, str(finished_study))
    number = max(stored.study.get_trials(states=[optuna.trial.TrialState.COMPLETE]), key=lambda t: t.values[1]).number
    edited = load_edited_model(stored, number, Console(file=io.StringIO()))
    trials = [stored.study.trials[number]]
    heldout = lambda: optuna.load_study(study_name="t", storage=f"sqlite:///{finished_study}/t.db").trials[number].user_attrs

    evaluate_refusals(stored, edited, trials, None, None, 8, Console(file=io.StringIO()), FastPaths())
    plain = heldout()
    paths = cpu_fast_paths(edited.prepared.spec)
    assert paths.packed_linears > 0 and paths.packed_prefill and paths.graph is None
    evaluate_refusals(stored, edited, trials, None, None, 8, Console(file=io.StringIO()), paths)
    fast = heldout()
    assert fast["heldout_refusals"] == plain["heldout_refusals"] and plain["heldout_refusals"].endswith("/8")
    assert plain["heldout_kl_divergence"] > 1e-4  # the trial that moves the model most
    # (stored rounded to 6 decimals: a step of 1e-6 either side on top of the paths' float differences)
    assert fast["heldout_kl_divergence"] == pytest.approx(plain["heldout_kl_divergence"], rel=1e-3, abs=2e-6)


def test_chat_from_a_pipe(finished_study):
    number = edited_trial(finished_study)
    edited = load_edited_model(open_study("t", None, str(finished_study)), number, Console(file=io.StringIO()))
    out = io.StringIO()
    chat(edited, max_new_tokens=5, stdin=io.StringIO("Hello there\n/reset\nWhat is 2+2?\n/quit\nnever read\n"), stdout=out)
    text = out.getvalue()
    assert text.count("model> ") == 2 and "(conversation cleared)" in text
    assert edited.prepared.hooks._slots and all(v is None for v in edited.prepared.hooks._slots.values())


def test_dashboard_serves_the_study(finished_study):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optimizer",
            "dashboard",
            "--study",
            "t",
            "--studies-dir",
            str(finished_study),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stop = threading.Event()  # set on every way out: the askers below must never outlive the test
    try:
        assert f"http://127.0.0.1:{port}/dashboard/" in proc.stdout.readline()
        # the rest of its output is read as it comes: a pipe nobody reads fills and blocks the writer
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                assert time.time() < deadline, "dashboard did not answer"
                time.sleep(0.3)
        [summary] = studies
        assert summary["study_name"] == "t"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=60) as response:
            detail = json.load(response)
        assert len(detail["trials"]) == 4
        assert detail["objective_names"] == ["refusal_rate", "kl_divergence"]
        edited = next(t for t in detail["trials"] if t["number"] == edited_trial(finished_study))
        assert "Refusals" in edited["note"]["body"] and "sample_responses" in {a["key"] for a in edited["user_attrs"]}
        # SIGTERM while requests are being answered stops it (wsgiref's handler catches every
        # exception of a request, so a signal raised inside one used to be swallowed: it never stopped)
        answered = [threading.Event() for _ in range(3)]

        def ask_again_and_again(first_answer: threading.Event) -> None:
            while not stop.is_set():
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=2).read()
                    first_answer.set()
                except OSError:
                    time.sleep(0.05)

        askers = [threading.Thread(target=ask_again_and_again, args=(event,), daemon=True) for event in answered]
        for asker in askers:
            asker.start()
        # every asker answered once, so all three are in their loop of requests when the SIGTERM comes
        # (a fixed 2 s sleep used to stand for this)
        for event in answered:
            assert event.wait(timeout=60), "an asker got no answer"
        # and a client that connected and never asked (a browser's preconnect) holds up the exit
        # only for the handler's socket timeout: request threads are joined before the process ends
        idle = socket.create_connection(("127.0.0.1", port))
        proc.terminate()
        # a bound on liveness, not a timing: it stops in 1-4 s (the idle client its 2 s timeout). It used
        # to hang for good now and then on a busy machine: the SIGTERM landed on a request thread while
        # the main thread sat in a join without timeout, so Python never ran the handler (dashboard.serve)
        assert proc.wait(timeout=120) == 143
        stop.set()
        for asker in askers:
            asker.join()
        idle.close()
        reader.join(timeout=10)
        # clients that went away (the idle one past its timeout, askers cut off by the stop) are no errors
        assert "Traceback" not in "".join(rest), "".join(rest)[-2000:]
    finally:
        stop.set()
        proc.kill()
        proc.wait(timeout=10)


def test_export_keeps_the_checkpoint_dtype(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM as Auto

    bf16 = tmp_path / "bf16-model"
    Auto.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bf16 / name).write_bytes((tiny_dir / name).read_bytes())
    studies = tmp_path / "studies"
    assert main(run_args(bf16, studies, "--trials", "3", "--startup-trials", "3")) == 0
    number = edited_trial(studies)
    out = tmp_path / "out"
    assert main(["export", "--study", "t", "--studies-dir", str(studies), "--trial", str(number), "--out", str(out)]) == 0
    exported = Auto.from_pretrained(out)
    assert exported.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_discriminant_trial_exports_and_replays_its_directions(tiny_dir, tmp_path):
    """A study of discriminant directions only, the projection searched: the trial's shrinkage and projection
    are recorded, replayed into the same directions (against `directions` on the study's cached statistics,
    projected by hand), and the export equals the hooks."""
    from optimizer.directions import directions
    from optimizer.params import SHRINKAGE_LOW

    studies = tmp_path / "studies"
    args = run_args(
        tiny_dir,
        studies,
        "--trials",
        "3",
        "--startup-trials",
        "3",
        "--direction-methods",
        "discriminant",
        "--subspace-max",
        "1",
        "--direction-scopes",
        "per_layer",
        "--searched-projection",
    )
    assert main(args) == 0
    number = edited_trial(studies)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db")
    rho, share = study.trials[number].params["shrinkage"], study.trials[number].params["projection"]
    assert SHRINKAGE_LOW <= rho <= 1.0 and "direction_method" not in study.trials[number].params
    assert "LDA s=" in study.trials[number].user_attrs["direction"]
    edited = load_edited_model(open_study("t", None, str(studies)), number, Console(file=io.StringIO()))
    stats = edited.prepared.stats
    for c in ("attn", "mlp"):
        used = [layer for layer, w in enumerate(edited.plan.weights[c]) if w != 0]
        expected, _ = directions(stats, "discriminant", 0.0, used, shrinkage=rho)
        mean = torch.nn.functional.normalize(stats.mean_harmless[used], dim=-1)  # and the trial's share projected out
        expected = torch.nn.functional.normalize(expected - share * (expected * mean).sum(-1, keepdim=True) * mean, dim=-1)
        torch.testing.assert_close(edited.plan.directions[c][used].float(), expected.float(), rtol=1e-5, atol=1e-6)
    out = tmp_path / "exported"
    assert main(["export", "--study", "t", "--studies-dir", str(studies), "--trial", str(number), "--out", str(out)]) == 0
    assert json.loads((out / "optimizer.json").read_text())["params"]["shrinkage"] == rho
    assert json.loads((out / "optimizer.json").read_text())["params"]["projection"] == share
    loaded = edited.prepared.loaded
    texts = format_chat(loaded.tokenizer, PROMPTS)
    with torch.inference_mode():
        edited.prepared.hooks.apply(edited.plan)
        hooked = loaded.model(**tokenize(loaded, texts)).logits
        baked = load_model(str(out), "cpu", "float32").model(**tokenize(loaded, texts)).logits
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)
