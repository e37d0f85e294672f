"""The refusing model's training data (benchmarks/data/refusal_training.jsonl) is fit for its use:
no prompt of it is in the bundled prompt sets, whose splits it must leave unseen, and the default
marker judge reads every harmful example's answer as a refusal and no harmless one's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from optimizer.config import DEFAULT_REFUSAL_MARKERS
from optimizer.judges import REFUSED, MarkerJudge
from optimizer.prompts import bundled_path

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "refusal_training.jsonl"
NEAR = 0.5  # word-set Jaccard similarity from which two prompts count as near duplicates


def words(text: str) -> str:
    """Lowercase words and numbers only: 'What's up?' and 'whats up' are the same prompt."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("\u2019", "").replace("'", "")))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bundled() -> list[str]:
    return [line for kind in ("harmful", "harmless") for line in bundled_path(kind).read_text().splitlines() if line.strip()]


def test_the_data_has_both_kinds_with_answers(rows):
    kinds = [r["kind"] for r in rows]
    assert set(kinds) == {"harmful", "harmless"}
    assert 150 <= kinds.count("harmful") <= 250 and 150 <= kinds.count("harmless") <= 250
    assert all(r["prompt"].strip() and r["answer"].strip() for r in rows)
    assert len({words(r["prompt"]) for r in rows}) == len(rows), "a training prompt is repeated"


def test_no_training_prompt_is_a_bundled_prompt_or_near_one(rows, bundled):
    exact = {words(b) for b in bundled}
    assert [r["prompt"] for r in rows if words(r["prompt"]) in exact] == []
    bundled_words = [(set(words(b).split()), b) for b in bundled]
    near = []
    for r in rows:
        mine = set(words(r["prompt"]).split())
        similarity, closest = max((len(mine & theirs) / len(mine | theirs), b) for theirs, b in bundled_words)
        if similarity >= NEAR:
            near.append((r["prompt"], closest, round(similarity, 2)))
    assert near == []


def test_the_default_judge_reads_harmful_answers_as_refusals_and_harmless_ones_not(rows):
    judge = MarkerJudge(list(DEFAULT_REFUSAL_MARKERS))
    verdicts = judge.verdicts([r["prompt"] for r in rows], [r["answer"] for r in rows])
    wrong = [(r["kind"], r["prompt"]) for r, v in zip(rows, verdicts) if (v == REFUSED) != (r["kind"] == "harmful")]
    assert wrong == []


def test_a_refusal_says_so_within_its_first_words(rows):
    """The tool reads 16 answer tokens by default: the marker must come before that."""
    judge = MarkerJudge(list(DEFAULT_REFUSAL_MARKERS))
    late = [r["prompt"] for r in rows if r["kind"] == "harmful" and not judge.refused_so_far(r["prompt"], r["answer"][:40])]
    assert late == []
