"""How well each judge agrees with hand labels, and where in an answer refusals start.

    python benchmarks/judges.py [--data benchmarks/data/judged_responses.jsonl] [--quick]

Reads the hand-labelled answers (128-token greedy answers of the default model, unedited and
edited; labels and the rule they follow in benchmarks/data/LABELLING.md) and runs every judge on
them:

- `markers@16` / `markers@128`: the plain marker rule (`markers:plain`, the rule before judges
  existed) on the answer's first 16 tokens (what trials saw) and on all of it;
- `echo-aware@16` / `echo-aware@128`: the default `markers` judge;
- `echo-aware@128+guard`: the same with the coherence guard (optimizer/coherence.py), calibrated
  on the unedited model's own answers, so that broken answers are called broken;
- `llm:<model>` for each bundled model (Qwen2.5-Coder-0.5B-Instruct, SmolLM2-135M-Instruct).

For each: accuracy and Cohen's kappa against the labels on refused-vs-not (refused = label
`refused`; hedged, complied and broken are not refusals), the four-label confusion matrix, and
seconds per 64 answers on this machine. Then the refusal-onset histogram: the token count of each
refused answer's `onset` (the shortest start after which the refusal is clear). Last line:
`default_judge_accuracy=<a> kappa=<k> markers16_accuracy=<b> labelled=<n>` (default judge:
echo-aware markers at 128 tokens with the guard).

`--quick` uses every fourth row (and skips nothing else), for a run of a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from optimizer.coherence import CoherenceGuard, answer_nll
from optimizer.config import DEFAULT_REFUSAL_MARKERS
from optimizer.fetch import QWEN_CODER_05B, SMOLLM2_135M, ensure_model_folder
from optimizer.judges import BROKEN, REFUSED, VERDICTS, MarkerJudge, make_judge
from optimizer.model import load_model
from optimizer.prompts import format_chat

DATA = ROOT / "benchmarks" / "data" / "judged_responses.jsonl"
CPU = torch.device("cpu")


def kappa(truth: list[bool], guess: list[bool]) -> float:
    """Cohen's kappa of two yes/no labellings."""
    n = len(truth)
    observed = sum(t == g for t, g in zip(truth, guess)) / n
    p_t, p_g = sum(truth) / n, sum(guess) / n
    expected = p_t * p_g + (1 - p_t) * (1 - p_g)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def first_tokens(tokenizer, text: str, n: int) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("label")]
    if args.quick:
        rows = rows[::4]
    labels = [r["label"] for r in rows]
    truth = [label == REFUSED for label in labels]
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    print(f"{len(rows)} labelled answers: {dict(Counter(labels))}; sources {dict(Counter(r['source'] for r in rows))}")

    qwen = load_model(str(ensure_model_folder(QWEN_CODER_05B)), "cpu", "float32")
    short = [first_tokens(qwen.tokenizer, a, 16) for a in answers]
    plain, echo = MarkerJudge(list(DEFAULT_REFUSAL_MARKERS), echo_aware=False), MarkerJudge(list(DEFAULT_REFUSAL_MARKERS))

    # the coherence guard: NLL of every answer under the unedited model, threshold from its own answers
    texts = format_chat(qwen.tokenizer, prompts)
    ids = [qwen.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    start = time.perf_counter()
    nll = answer_nll(qwen, texts, ids, 16)
    guard_s = time.perf_counter() - start
    guard = CoherenceGuard.calibrate([x for x, r in zip(nll, rows) if r["source"] == "original"])
    broken = [guard.broken(x, i) for x, i in zip(nll, ids)]

    results: dict[str, tuple[list[str], float]] = {}

    def timed(name: str, run) -> None:
        start = time.perf_counter()
        verdicts = run()
        results[name] = (verdicts, time.perf_counter() - start)

    timed("markers@16 (plain)", lambda: plain.verdicts(prompts, short))
    timed("markers@128 (plain)", lambda: plain.verdicts(prompts, answers))
    timed("echo-aware@16", lambda: echo.verdicts(prompts, short))
    timed("echo-aware@128", lambda: echo.verdicts(prompts, answers))
    verdicts, seconds = results["echo-aware@128"]
    results["echo-aware@128+guard"] = ([BROKEN if b else v for b, v in zip(broken, verdicts)], seconds + guard_s)
    for model in (QWEN_CODER_05B, SMOLLM2_135M):
        folder = ensure_model_folder(model)
        judge = make_judge(f"llm:{folder}", [], CPU)
        timed(f"llm:{model.name}", lambda judge=judge: judge.verdicts(prompts, answers))
        del judge

    print()
    print("| judge | accuracy (refused vs not) | kappa | s per 64 answers | guessed refused |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, (verdicts, seconds) in results.items():
        guess = [v == REFUSED for v in verdicts]
        accuracy = sum(t == g for t, g in zip(truth, guess)) / len(rows)
        k = kappa(truth, guess)
        summary[name] = (accuracy, k)
        print(f"| {name} | {accuracy:.3f} | {k:.3f} | {64 * seconds / len(rows):.2f} | {sum(guess)}/{len(rows)} |")
    print(f"\n(hand labels: {sum(truth)}/{len(rows)} refused)")
    for name, (verdicts, _) in results.items():
        print(f"\nConfusion of {name} (rows: hand label, columns: judge)")
        print("| label | " + " | ".join(VERDICTS) + " |")
        print("|---|" + "---|" * len(VERDICTS))
        for label in VERDICTS:
            row = Counter(v for v, lab in zip(verdicts, labels) if lab == label)
            print(f"| {label} | " + " | ".join(str(row.get(v, 0)) for v in VERDICTS) + " |")
    wrong = [(r["id"], r["label"], v) for r, v in zip(rows, results["echo-aware@128+guard"][0])
             if (r["label"] == REFUSED) != (v == REFUSED)]  # fmt: skip
    print(
        f"\nDefault judge's disagreements on refused-vs-not ({len(wrong)}): " + ", ".join(f"{i} ({a}->{b})" for i, a, b in wrong)
    )
    guard_hits = Counter((lab == BROKEN, b) for lab, b in zip(labels, broken))
    print(
        f"Coherence guard (limit {guard.nll_limit:.2f} nats/token): broken labels caught {guard_hits[(True, True)]}/"
        f"{labels.count(BROKEN)}, other answers called broken {guard_hits[(False, True)]}/{len(rows) - labels.count(BROKEN)}"
    )

    onsets = [
        len(qwen.tokenizer(r["onset"], add_special_tokens=False)["input_ids"])
        for r in rows
        if r["label"] == REFUSED and r.get("onset")
    ]
    if onsets:
        print("\nRefusal onset (tokens into the answer at which the refusal is clear):")
        print("| tokens | refusals |")
        print("|---|---|")
        edges = [(1, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128)]
        for low, high in edges:
            print(f"| {low}-{high} | {sum(low <= n <= high for n in onsets)} |")
        ordered = sorted(onsets)
        q95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(f"median {ordered[len(ordered) // 2]}, 95th percentile {q95}, max {ordered[-1]} tokens ({len(onsets)} refusals)")
    accuracy, k = summary["echo-aware@128+guard"]
    print(f"default_judge_accuracy={accuracy:.3f} kappa={k:.3f} markers16_accuracy={summary['markers@16 (plain)'][0]:.3f} "
          f"labelled={len(rows)}")  # fmt: skip


if __name__ == "__main__":
    main()
