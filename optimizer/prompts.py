"""Prompt sets: bundled, from files (.txt, .jsonl, .csv) or datasets; deterministic splits; chat formatting."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from optimizer.errors import UserError

# Fractions of every prompt set; what is left after these two is the held-out split.
DIRECTION_FRACTION = 0.5
SCORING_FRACTION = 0.3
TEXT_KEYS = ("prompt", "text", "instruction", "goal", "question", "query")


@dataclass(frozen=True)
class PromptSplits:
    """Three disjoint parts of one prompt set. No study ever reads `heldout`."""

    direction: list[str]
    scoring: list[str]
    heldout: list[str]


def bundled_path(kind: str) -> Path:
    return Path(str(resources.files("optimizer") / "data" / f"{kind}.txt"))


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; check the path")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise UserError(f"prompt file {path} looks binary; give a UTF-8 .txt, .jsonl or .csv file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None


def _text_of(record: object, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in TEXT_KEYS:
            if isinstance(record.get(key), str):
                return record[key]
    raise UserError(f"{where}: no prompt text found; use a string or an object with one of the keys {', '.join(TEXT_KEYS)}")


def _parse(path: Path, text: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(_text_of(json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number} is not valid JSON ({e.msg}); one JSON object per line") from None
        return prompts
    if suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        column = next((header.index(k) for k in TEXT_KEYS if k in header), None)
        if column is None:
            column, body = 0, rows  # no known header: first column, every row a prompt
        else:
            body = rows[1:]
        return [row[column] for row in body if len(row) > column]
    return text.splitlines()


def _load_dataset(spec: str) -> list[str]:
    """`dataset:NAME[:SPLIT[:COLUMN]]` through the datasets library."""
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    column = parts[3] if len(parts) > 3 else None
    if not name:
        raise UserError(f"bad dataset spec {spec!r}; use dataset:NAME[:SPLIT[:COLUMN]]")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 (the datasets library raises many unrelated types)
        raise UserError(f"could not load dataset {name} split {split}: {str(e).splitlines()[0]}") from None
    column = column or next((k for k in TEXT_KEYS if k in ds.column_names), None)
    if column not in ds.column_names:
        raise UserError(f"dataset {name} has no column {column!r}; columns: {', '.join(ds.column_names)}")
    return [str(x) for x in ds[column]]


def load_prompts(spec: str | None, kind: str) -> list[str]:
    """Read one prompt set; None gives the bundled `kind` set ('harmful' or 'harmless')."""
    if spec is not None and spec.startswith("dataset:"):
        raw = _load_dataset(spec)
    else:
        path = Path(spec).expanduser() if spec else bundled_path(kind)
        raw = _parse(path, _read_text(path))
    seen: set[str] = set()
    prompts = []
    for p in (p.strip() for p in raw):
        if p and p not in seen:
            seen.add(p)
            prompts.append(p)
    if not prompts:
        raise UserError(f"the {kind} prompt set {spec} has no prompts; give a file with one prompt per line")
    return prompts


def split_prompts(prompts: list[str]) -> PromptSplits:
    """Split deterministically (by a hash of each prompt, not by file order) into three parts."""
    ordered = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    n_direction = int(len(ordered) * DIRECTION_FRACTION)
    n_scoring = int(len(ordered) * SCORING_FRACTION)
    return PromptSplits(
        direction=ordered[:n_direction],
        scoring=ordered[n_direction : n_direction + n_scoring],
        heldout=ordered[n_direction + n_scoring :],
    )


def take(prompts: list[str], n: int, what: str, flag: str) -> list[str]:
    if len(prompts) < n:
        raise UserError(f"asked for {n} {what} prompts but the set has only {len(prompts)}; lower {flag} or give more prompts")
    return prompts[:n]


def render_chat(tokenizer, messages: list[dict], template_kwargs: dict[str, Any] | None = None) -> str:
    """The chat template applied to `messages`, ending with the generation prompt. `template_kwargs`
    are extra template variables (e.g. enable_thinking=False); templates ignore ones they do not read."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))


def format_chat(
    tokenizer,
    prompts: list[str],
    system_prompt: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Apply the chat template, ending where the assistant's answer starts."""
    texts = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        texts.append(render_chat(tokenizer, messages, template_kwargs))
    return texts
