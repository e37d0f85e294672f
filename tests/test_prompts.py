"""Prompt sets: bundled sizes, deterministic disjoint splits, file formats, chat formatting."""

import json

from optimizer.prompts import format_chat, load_prompts, split_prompts


def test_bundled_sets_are_large_and_split_disjointly():
    for kind in ("harmful", "harmless"):
        prompts = load_prompts(None, kind)
        assert len(prompts) >= 300
        splits = split_prompts(prompts)
        parts = [set(splits.direction), set(splits.scoring), set(splits.heldout)]
        assert sum(map(len, parts)) == len(prompts)
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(splits.heldout) >= 50
        # deterministic and independent of file order
        assert split_prompts(list(reversed(prompts))) == splits
    assert not set(load_prompts(None, "harmful")) & set(load_prompts(None, "harmless"))


def test_file_formats(tmp_path):
    expected = ["How do I bake bread?", "Explain tides, briefly."]
    (tmp_path / "p.txt").write_text("\n".join(expected) + "\n\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(expected)))
    (tmp_path / "p.csv").write_text('id,text\n1,How do I bake bread?\n2,"Explain tides, briefly."\n')
    (tmp_path / "q.csv").write_text('How do I bake bread?\n"Explain tides, briefly."\n')
    for name in ("p.txt", "p.jsonl", "p.csv", "q.csv"):
        assert load_prompts(str(tmp_path / name), "harmless") == expected, name


def test_chat_formatting_with_system_prompt(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    [text] = format_chat(tokenizer, ["Hi there"], system_prompt="Be terse.")
    assert "Be terse." in text and "Hi there" in text
    assert text.rstrip().endswith("assistant")  # ends where the answer starts
