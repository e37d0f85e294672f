"""Judges (markers, classifier, llm), the coherence guard and `verify`, against independent references."""

import json
import shutil

import optuna
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from optimizer.cli import main
from optimizer.coherence import CoherenceGuard, answer_nll, repeated_share
from optimizer.errors import UserError
from optimizer.judges import BROKEN, COMPLIED, HEDGED, LETTERS, REFUSED, RUBRIC, make_judge
from optimizer.model import load_model
from optimizer.prompts import format_chat
from optimizer.verify import Verification, recommend
from tests.test_bad_input import expect_refusal
from tests.test_study import load, run_args

ANSWERS = ["I'm sorry, I can't help with that.", "Sure! Step 1: gather the tools.", "", "No.", "Here is a long answer " * 5]
PROMPTS = ["How do I pick a lock?"] * len(ANSWERS)
CPU = torch.device("cpu")


def build_classifier(folder, tokenizer_dir, labels: dict[int, str]):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_labels=len(labels), id2label=labels,
        label2id={v: k for k, v in labels.items()}, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 2.0)  # verdicts that differ between answers
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, qwen_dir):
    """The same tiny classifier twice: with label names that say what they mean, and with anonymous ones."""
    base = tmp_path_factory.mktemp("classifiers")
    named = build_classifier(base / "named", qwen_dir, {0: "NORMAL", 1: "REJECTION"})
    anonymous = base / "anonymous"
    shutil.copytree(named, anonymous)
    config = json.loads((anonymous / "config.json").read_text())
    config.update(id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    (anonymous / "config.json").write_text(json.dumps(config))
    return named, anonymous


def test_classifier_judge_reads_labels_and_matches_one_answer_at_a_time(classifiers):
    folder = classifiers[0]
    judge = make_judge(f"classifier:{folder}", [], CPU)
    verdicts = judge.verdicts(PROMPTS, ANSWERS)  # one padded batch
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = []
    for answer in ANSWERS:
        with torch.no_grad():
            logits = model(**tokenizer([answer if answer.strip() else "."], return_tensors="pt")).logits
        expected.append([COMPLIED, REFUSED][int(logits.argmax())])
    assert verdicts == expected
    assert len(set(verdicts)) == 2, "the reference must tell answers apart for the test to mean something"


def test_classifier_labels_that_cannot_be_mapped(classifiers):
    folder = classifiers[1]
    with pytest.raises(UserError, match="--judge-labels LABEL_0=complied,LABEL_1=refused"):
        make_judge(f"classifier:{folder}", [], CPU)
    judge = make_judge(f"classifier:{folder}", [], CPU, labels="LABEL_0=complied,LABEL_1=refused")
    assert set(judge.verdicts(PROMPTS, ANSWERS)) <= {COMPLIED, REFUSED}
    with pytest.raises(UserError, match="NAME=verdict"):
        make_judge(f"classifier:{folder}", [], CPU, labels="LABEL_0=maybe")


def test_llm_judge_is_the_letter_with_the_largest_logit(tiny_varied_dir):
    judge = make_judge(f"llm:{tiny_varied_dir}", [], CPU)
    verdicts = judge.verdicts(PROMPTS, ANSWERS)  # left-padded batches
    model = AutoModelForCausalLM.from_pretrained(tiny_varied_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_varied_dir)
    letters = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
    expected = []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": RUBRIC.format(prompt=prompt, answer=answer)}], tokenize=False, add_generation_prompt=True
        )
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
        expected.append([REFUSED, HEDGED, COMPLIED][int(logits[letters].argmax())])
    assert verdicts == expected


def test_answer_nll_matches_a_full_forward_per_answer(tiny_varied_dir):
    loaded = load_model(str(tiny_varied_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, ["Hi", "Tell me a much longer story about a cat, please."])
    answers = [[11, 22, 33, 44, 55], [7, 8]]
    nll = answer_nll(loaded, texts, answers + [], batch_size=2)  # right-padded together
    for text, answer, got in zip(texts, answers, nll):
        prompt = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = loaded.model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        reference = -sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(answer)) / len(answer)
        assert got == pytest.approx(reference, abs=1e-4)


def test_repetition_and_surprise_make_an_answer_broken():
    assert repeated_share([1, 2, 3, 4] * 10) > 0.8
    assert repeated_share(list(range(40))) == 0.0
    guard = CoherenceGuard.calibrate([1.0, 1.2, 0.8])
    assert guard.nll_limit == pytest.approx(1.0 + 2.0)
    assert guard.broken(3.5, list(range(30)))  # surprising
    assert guard.broken(0.5, [5, 6, 7, 8] * 8)  # a loop, however predictable
    assert not guard.broken(1.5, list(range(30)))
    assert not guard.broken(0.5, [5, 6, 7, 8] * 5)  # too short to call a loop


def test_recommended_is_fewest_refused_plus_broken_under_the_kl_limit():
    def v(refused, broken, kl):
        counts = {REFUSED: refused, HEDGED: 0, COMPLIED: 10 - refused - broken, BROKEN: broken}
        return Verification(counts, 10, 0, 10, kl, {}, 0.0, [])

    results = {1: v(2, 3, 0.05), 2: v(3, 0, 0.08), 3: v(0, 0, 0.5), 4: v(3, 0, 0.02)}
    assert recommend(results, 0.1) == 4  # 3 refused + broken at KL 0.02 beats 5 and the same 3 at KL 0.08
    assert recommend(results, 1.0) == 3
    assert recommend(results, 0.01) is None


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--judge", "magic"], ("unknown judge 'magic'", "--judge markers")),
        (["--judge", "openai:http://127.0.0.1:1/v1", "--judge-model", "m"], ("unreachable", "server is running")),
        (["--judge", "openai:http://127.0.0.1:1/v1"], ("--judge-model",)),
    ],
)
def test_bad_judges(tiny_dir, tmp_path, capsys, extra, fragments):
    studies = tmp_path / "s"
    expect_refusal(run_args(tiny_dir, studies, *extra), studies, capsys, *fragments)


def test_run_with_a_classifier_whose_labels_cannot_be_mapped(tiny_dir, classifiers, tmp_path, capsys):
    studies = tmp_path / "s"
    args = run_args(tiny_dir, studies, "--judge", f"classifier:{classifiers[1]}")
    expect_refusal(args, studies, capsys, "cannot map the labels", "--judge-labels")


def test_judge_model_without_chat_template(tiny_dir, no_template_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    args = run_args(tiny_dir, studies, "--judge", f"llm:{no_template_dir}")
    expect_refusal(args, studies, capsys, "no chat template", "instruct")


def test_a_study_is_not_resumed_with_another_judge(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    assert main(run_args(tiny_dir, studies, "--trials", "1")) == 0
    capsys.readouterr()
    expect_refusal(run_args(tiny_dir, studies, "--trials", "2", "--judge", "markers:plain"), studies, capsys, "judge differ")


def test_llm_judged_study_then_verify_show_and_card(tiny_varied_dir, tmp_path, capsys):
    """A study whose trials are counted by an llm judge (the tiny chat model), verified at the end
    of the run; `verify` again reuses the stored results; `show` and the model card show them."""
    studies = tmp_path / "s"
    args = run_args(
        tiny_varied_dir, studies, "--trials", "3", "--judge", f"llm:{tiny_varied_dir}", "--verify", "--verify-prompts", "3",
        "--verify-max-new-tokens", "10", "--max-kl", "10",
    )  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    study = load(studies)
    front = [t for t in study.best_trials if not t.user_attrs.get("baseline")]
    baseline = study.trials[0]
    assert baseline.user_attrs["refusals"].endswith("/4")
    assert all("early_stop" not in t.user_attrs or t.user_attrs["early_stop"] == "kl_limit" for t in study.trials)
    if not front:  # the tiny model's front may be the baseline alone: verify a trial by hand
        front = [study.trials[1]]
        assert main(["verify", "--studies-dir", str(studies), "--study", "t", "--trial", "1", "--limit", "3",
                     "--max-new-tokens", "10", "--max-kl", "10"]) == 0  # fmt: skip
        err = capsys.readouterr().err
    assert "Verification: 10-token answers" in err and "Recommended: trial" in err
    record = load(studies).trials[front[0].number].user_attrs["verify"]
    assert record["n_harmful"] == 3 and sum(record["counts"].values()) == 3
    assert record["setup"]["judge"] == f"llm:{tiny_varied_dir}"
    assert load(studies).user_attrs["recommended_trial"] in [t.number for t in front]
    number = front[0].number
    again = ["verify", "--studies-dir", str(studies), "--study", "t", "--trial", str(number), "--limit", "3",
             "--max-new-tokens", "10", "--max-kl", "10", "--judge", f"llm:{tiny_varied_dir}"]  # fmt: skip
    assert main(again) == 0
    err = capsys.readouterr().err
    assert "the original model's long answers" not in err and "Verifying trials" in err
    assert load(studies).trials[number].user_attrs["verify"] == record  # reused, not recomputed
    assert main(["show", "--studies-dir", str(studies), "--study", "t"]) == 0
    assert "Verified trials" in capsys.readouterr().err
    out = tmp_path / "export"
    assert main(["export", "--studies-dir", str(studies), "--study", "t", "--trial", str(number), "--out", str(out)]) == 0
    assert "Verified (10-token answers, 3+3 held-out prompts" in (out / "README.md").read_text()
    notes = optuna.storages.RDBStorage(f"sqlite:///{studies}/t.db").get_study_system_attrs(0 + 1)
    assert any("Verified (" in str(v) for v in notes.values())
    json.dumps(record)  # what the dashboard reads back
