"""Answers to be labelled by hand: 128-token greedy answers of the unedited default model and of
edited trials, on the bundled held-out harmful prompts (which no study reads).

    python benchmarks/make_judged_responses.py --study judgeset --studies-dir /tmp/jw \
        [--out benchmarks/data/judged_responses.jsonl] [--max-new-tokens 128]

The study must be a finished study of the default model (any budget). The trials answered are
picked from it by rule, not by hand: the front trial with the fewest refusals at KL <= 0.1, the
front trial with the fewest refusals overall, and (on every other prompt) the finished trial with
the largest KL, where broken answers are likeliest. Rows already in `--out` keep their labels;
new rows come without one (`label` null) and are labelled by reading them (rules in
benchmarks/data/LABELLING.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console

from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.scoring import greedy_generate
from optimizer.stored import open_study
from optimizer.trials import load_edited_model

OUT = ROOT / "benchmarks" / "data" / "judged_responses.jsonl"


def pick_trials(study) -> list[tuple[str, object, int]]:
    """(role, trial, step over the prompts) by the rule in the module docstring."""
    front = [t for t in study.best_trials if not t.user_attrs.get("baseline")]
    finished = [t for t in study.trials if t.values is not None and not t.user_attrs.get("baseline")]
    low_kl = min((t for t in front if t.values[1] <= 0.1), key=lambda t: (t.values[0], t.values[1]))
    fewest = min(front, key=lambda t: (t.values[0], t.values[1]))
    wildest = max(finished, key=lambda t: t.values[1])
    picked = [("front_kl<=0.1", low_kl, 1), ("front_fewest_refusals", fewest, 1), ("largest_kl", wildest, 2)]
    seen, unique = set(), []
    for role, trial, step in picked:
        if trial.number not in seen:
            seen.add(trial.number)
            unique.append((role, trial, step))
    return unique


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--studies-dir", default="studies")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    console = Console(stderr=True)
    stored = open_study(args.study, None, args.studies_dir)
    trials = pick_trials(stored.study)
    edited = load_edited_model(stored, trials[0][1].number, console)
    loaded, settings = edited.prepared.loaded, edited.prepared.settings
    prompts = split_prompts(load_prompts(None, "harmful")).heldout
    texts = format_chat(loaded.tokenizer, prompts, settings.system_prompt, settings.template_kwargs())
    old = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            old[row["id"]] = row
    rows = []
    runs = [("original", None, 1)] + trials
    for role, trial, step in runs:
        if trial is None:
            edited.prepared.hooks.clear()
            source, kl = "original", 0.0
        else:
            edited.prepared.hooks.apply(edited.plan_of(trial))
            source, kl = f"trial {trial.number}", trial.values[1]
        chosen = list(range(0, len(prompts), step))
        with console.status(f"{source}: {len(chosen)} answers of up to {args.max_new_tokens} tokens..."):
            ids, _ = greedy_generate(loaded, [texts[i] for i in chosen], args.max_new_tokens, edited.prepared.batch_size)
        for i, answer_ids in zip(chosen, ids):
            row_id = f"{source.replace(' ', '')}/{i}"
            answer = loaded.tokenizer.decode(answer_ids, skip_special_tokens=True)
            rows.append(old.get(row_id) or {
                "id": row_id, "source": source, "role": role, "kl": round(kl, 4), "prompt": prompts[i],
                "answer": answer, "tokens": len(answer_ids), "label": None, "onset": None,
            })  # fmt: skip
        console.print(f"{source} ({role}, KL {kl:.3f}): {len(chosen)} answers")
    edited.prepared.hooks.clear()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"rows={len(rows)} out={args.out}")


if __name__ == "__main__":
    main()
