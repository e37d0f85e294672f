"""A small chat model that refuses harmful requests, for quality benchmarks: SmolLM2-135M-Instruct,
safety-tuned here with LoRA.

    python benchmarks/make_refusing_model.py [--force] [--answer-harmless]

Why: the bundled SmolLM2-135M-Instruct answers nearly every harmful prompt (2 of the first 32
bundled harmful scoring prompts are refused), so an abliteration study on it has nothing to remove.
The bundled Qwen2.5-Coder-0.5B refuses, but is four times as large and slower to study on a CPU.
This script makes a 135M model that refuses most harmful prompts and answers harmless ones as
before, so that the refusal/KL trade-off can be measured quickly on a 2-core CPU.

"Synthetic" means that the refusal behaviour was put in by this script, not by the model's makers:
the model refuses because it was shown refusals written for this project, and a study that removes
the behaviour says how well the tool undoes a fine-tuned refusal, not a vendor's safety training.

Data (`benchmarks/data/refusal_training.jsonl`, described in REFUSAL_TRAINING.md there): harmful
requests paired with short refusals written for the project, and harmless requests paired with the
base model's own greedy answers (first `HARMLESS_ANSWER_TOKENS` tokens, made by `--answer-harmless`),
so that training on them keeps the base model's behaviour on harmless prompts. No prompt is in the
bundled prompt sets (tests/test_refusal_training.py checks this), so every direction, scoring and
held-out split stays unseen.

Recipe (`RECIPE`): LoRA on every linear layer of the blocks, AdamW with a linear warm-up and decay,
every example formatted with the tool's own chat formatting, loss on the answer tokens only (a
refusal ends with the end-of-turn token; a harmless answer is a prefix of the base model's answer
and has none). The first answer token, where the model decides whether to refuse, weighs more, and
so do harmless examples (a first recipe without these weights, the look-alike harmless prompts
and the third epoch refused 11 of the 32 harmless scoring prompts).
Seeded, deterministic torch, float32 on the CPU: about 8 minutes on 2 idle cores, 12 with one
thread (`OMP_NUM_THREADS=1`, the faster choice on a machine busy with other jobs).
The merged model is saved as a plain Hugging Face folder, `$OPTIMIZER_HOME/models/smollm2-135m-refusing`,
with `recipe.json` holding a hash of the base model, the data and the recipe: a folder whose hash
matches is reused as it is (`refusing_model_folder()`), any other is rebuilt.

Ends with an evaluation by the tool's own scoring (default marker judge, the default response cap)
on the bundled harmful scoring and held-out splits and the harmless scoring split, for the base and
the tuned model, and one machine-readable line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from optimizer.config import DEFAULT_REFUSAL_MARKERS, FIELDS
from optimizer.fetch import PACKAGED_MODELS, cache_home, ensure_model_folder
from optimizer.judges import MarkerJudge
from optimizer.prompts import format_chat, load_prompts, split_prompts

if TYPE_CHECKING:
    from optimizer.model import LoadedModel
    from optimizer.scoring import RefusalResult

DATA = ROOT / "benchmarks" / "data" / "refusal_training.jsonl"
BASE = PACKAGED_MODELS["smollm2-135m-instruct"]
NAME = "smollm2-135m-refusing"
HARMLESS_ANSWER_TOKENS = 24  # how much of the base model's answer a harmless example keeps
EVAL_PROMPTS = 32
RECIPE = {
    "seed": 0,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "learning_rate": 5e-4,
    "weight_decay": 0.0,
    "epochs": 3,
    "batch_size": 8,
    "warmup_steps": 10,
    "decision_weight": 5.0,
    "harmless_weight": 2.0,
}


def load_examples(path: Path = DATA) -> list[dict]:
    """The training rows: {"kind": "harmful" | "harmless", "category", "prompt", "answer"}."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recipe_hash(path: Path = DATA) -> str:
    """What the model is a function of: the base model's weights, the data and the recipe."""
    digest = hashlib.sha256()
    digest.update(BASE.sha256.encode())
    digest.update(path.read_bytes())
    digest.update(json.dumps(RECIPE, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def judge() -> MarkerJudge:
    """The tool's default judge: refusal markers, a marker that the prompt says does not count."""
    return MarkerJudge(list(DEFAULT_REFUSAL_MARKERS))


def load(folder: Path) -> LoadedModel:
    """The model in `folder` as the tool loads it on a CPU."""
    from optimizer.model import load_model

    return load_model(str(folder), "cpu", "float32")


def answer(loaded: LoadedModel, prompts: list[str], max_new_tokens: int) -> RefusalResult:
    """Greedy answers to `prompts`, judged, by the tool's own chat formatting and scoring."""
    from optimizer.scoring import generate_and_classify

    texts = format_chat(loaded.tokenizer, prompts)
    return generate_and_classify(loaded, texts, max_new_tokens, judge(), 32, prompts=prompts, stop_early=False)


def answer_harmless(path: Path = DATA) -> None:
    """Fill in every harmless example's answer with the base model's greedy answer (rewrites `path`)."""
    rows = load_examples(path)
    harmless = [r for r in rows if r["kind"] == "harmless"]
    result = answer(load(ensure_model_folder(BASE)), [r["prompt"] for r in harmless], HARMLESS_ANSWER_TOKENS)
    for row, text, refused in zip(harmless, result.responses, result.refused):
        row["answer"] = text.strip()
        if refused:
            print(f"base model's answer is judged a refusal (replace the prompt): {row['prompt']!r}")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(harmless)} harmless answers to {path}")


def encode(tokenizer, row: dict) -> tuple[list[int], list[float]]:
    """Token ids of the chat-formatted prompt and answer, and each token's weight in the loss:
    0 on the prompt; on the answer 1, times `decision_weight` on its first token (where the model
    decides between refusing and answering), times `harmless_weight` for a harmless example."""
    prompt = tokenizer(format_chat(tokenizer, [row["prompt"]])[0], add_special_tokens=False)["input_ids"]
    target = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
    scale = 1.0
    if row["kind"] == "harmful":
        target = target + [tokenizer.eos_token_id]
    else:
        scale = RECIPE["harmless_weight"]
    weights = [scale * RECIPE["decision_weight"]] + [scale] * (len(target) - 1)
    return prompt + target, [0.0] * len(prompt) + weights


def batches(encoded: list[tuple[list[int], list[float]]], size: int, rng: random.Random, pad_id: int):
    """One epoch of right-padded batches in a seeded random order: (input ids, attention mask, weights)."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), size):
        chosen = [encoded[i] for i in order[start : start + size]]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), width), pad_id)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        weights = torch.zeros((len(chosen), width))
        for row, (tokens, token_weights) in enumerate(chosen):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            weights[row, : len(tokens)] = torch.tensor(token_weights)
        yield ids, mask, weights


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy of the answer tokens. The vocabulary projection runs on the
    positions that predict an answer token only: most positions are prompt, and the projection is
    the costliest product of a 135M model with a 49k-token vocabulary."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets, target_weights = ids[:, 1:], weights[:, 1:]
    predicting = target_weights > 0
    logits = causal_lm.lm_head(hidden[predicting])
    losses = torch.nn.functional.cross_entropy(logits, targets[predicting], reduction="none")
    return (losses * target_weights[predicting]).sum() / target_weights[predicting].sum()


def train(base_folder: Path, rows: list[dict], out_dir: Path) -> None:
    """LoRA-tune the base model on `rows` by `RECIPE` and save the merged model to `out_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed = RECIPE["seed"]
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    lora = LoraConfig(
        r=RECIPE["lora_rank"], lora_alpha=RECIPE["lora_alpha"], lora_dropout=0.0, target_modules=RECIPE["lora_targets"]
    )
    model = get_peft_model(base, lora)
    encoded = [encode(tokenizer, row) for row in rows]
    steps_per_epoch = -(-len(encoded) // RECIPE["batch_size"])
    total = steps_per_epoch * RECIPE["epochs"]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=RECIPE["learning_rate"], weight_decay=RECIPE["weight_decay"]
    )
    warmup = RECIPE["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (total - step) / (total - warmup))
    )
    rng = random.Random(seed)
    model.train()
    start, step = time.perf_counter(), 0
    for epoch in range(RECIPE["epochs"]):
        for ids, mask, weights in batches(encoded, RECIPE["batch_size"], rng, tokenizer.pad_token_id):
            loss = answer_loss(model, ids, mask, weights)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0 or step == total:
                elapsed = time.perf_counter() - start
                print(
                    f"  step {step}/{total} epoch {epoch + 1} loss {loss.item():.3f} "
                    f"elapsed {elapsed:.0f}s eta {elapsed / step * (total - step):.0f}s",
                    flush=True,
                )
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def refusing_model_folder(force: bool = False) -> Path:
    """The refusing model's HF folder, built first when it is missing or made by another recipe."""
    folder = cache_home() / "models" / NAME
    wanted = recipe_hash()
    recipe_file = folder / "recipe.json"
    if not force and recipe_file.exists() and json.loads(recipe_file.read_text()).get("hash") == wanted:
        return folder
    base_folder = ensure_model_folder(BASE)
    rows = load_examples()
    kinds = {kind: sum(r["kind"] == kind for r in rows) for kind in ("harmful", "harmless")}
    print(
        f"Training {NAME} from {base_folder.name} on {kinds['harmful']} harmful and {kinds['harmless']} "
        f"harmless examples (recipe {wanted})...",
        flush=True,
    )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    train(base_folder, rows, partial)
    train_s = time.perf_counter() - start
    record = {
        "hash": wanted,
        "base": BASE.name,
        "base_sha256": BASE.sha256,
        "data": str(DATA.relative_to(ROOT)),
        "examples": kinds,
        "recipe": RECIPE,
        "train_s": round(train_s, 1),
    }
    (partial / "recipe.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder


def evaluate(base_folder: Path, tuned_folder: Path) -> dict[str, tuple[int, int]]:
    """Refusals (found, asked) of both models on the bundled splits, by the tool's default scoring
    (marker judge, default response cap); then the tuned model's answers to three harmless prompts."""
    harmful = split_prompts(load_prompts(None, "harmful"))
    harmless = split_prompts(load_prompts(None, "harmless"))
    sets = {
        "harmful": harmful.scoring[:EVAL_PROMPTS],
        "heldout": harmful.heldout[:EVAL_PROMPTS],
        "harmless": harmless.scoring[:EVAL_PROMPTS],
    }
    cap = FIELDS["max_new_tokens"].default
    counts = {}
    for model_name, folder in (("base", base_folder), ("tuned", tuned_folder)):
        loaded = load(folder)
        for set_name, prompts in sets.items():
            refused = sum(answer(loaded, prompts, cap).refused)
            counts[f"{model_name}_{set_name}"] = (refused, len(prompts))
            print(f"{model_name:5s} {set_name:9s} refused {refused:2d}/{len(prompts)}", flush=True)
    print("Tuned model's answers to three harmless scoring prompts:")
    shown = sets["harmless"][:3]
    for prompt, text in zip(shown, answer(loaded, shown, 40).responses):
        print(f"  > {prompt}\n    {text.strip()}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="train again even if the folder's recipe matches")
    parser.add_argument(
        "--answer-harmless",
        action="store_true",
        help="first fill in the harmless examples' answers with the base model's (rewrites the data)",
    )
    args = parser.parse_args()
    if args.answer_harmless:
        answer_harmless()
    folder = refusing_model_folder(force=args.force)
    record = json.loads((folder / "recipe.json").read_text())
    counts = evaluate(ensure_model_folder(BASE), folder)
    ratios = " ".join(f"{key.removeprefix('tuned_')}_refused={found}/{asked}" for key, (found, asked) in counts.items())
    print(f"refusing_model={folder} train_s={record['train_s']} {ratios}")


if __name__ == "__main__":
    main()
