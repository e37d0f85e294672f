"""Bad input: a one-line message naming the problem and the fix, exit code 2, the study untouched."""

from pathlib import Path

import pytest

from optimizer.cli import main
from tests.conftest import file_digest
from tests.test_study import run_args


def expect_refusal(args: list[str], studies: Path, capsys, *fragments: str) -> str:
    db = studies / "t.db"
    before = file_digest(db)
    cache_before = {p.name: file_digest(p) for p in (studies / "t").glob("[!.]*")}
    assert main(args) == 2
    err = capsys.readouterr().err
    message = err[err.index("error:") :].strip()
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in message, message
    assert file_digest(db) == before, "the study file must not change"
    assert {p.name: file_digest(p) for p in (studies / "t").glob("[!.]*")} == cache_before, "the cache must not change"
    return message


def test_missing_model_path(tmp_path, capsys):
    studies = tmp_path / "s"
    expect_refusal(run_args(tmp_path / "nope", studies), studies, capsys, "does not exist", "--model")


def test_unknown_hub_id_while_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    studies = tmp_path / "s"
    args = run_args(Path("x"), studies)
    args[args.index("--model") + 1] = "no-such-org/no-such-model"
    expect_refusal(args, studies, capsys, "could not load model", "offline")


@pytest.mark.parametrize(
    "content, fragments",
    [
        (b"", ("no prompts",)),
        (b"\n  \n\n", ("no prompts",)),
        (b"\x00\x01\x02binary", ("looks binary",)),
        ("caf\u00e9 prompt\n".encode("latin-1"), ("not UTF-8", "re-save")),
    ],
)
def test_bad_prompt_file(tiny_dir, tmp_path, capsys, content, fragments):
    studies = tmp_path / "s"
    prompts = tmp_path / "harmful.txt"
    prompts.write_bytes(content)
    expect_refusal(run_args(tiny_dir, studies, "--harmful", str(prompts)), studies, capsys, *fragments)


def test_missing_prompt_file(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    expect_refusal(run_args(tiny_dir, studies, "--harmless", str(tmp_path / "none.txt")), studies, capsys, "does not exist")


def test_fewer_prompts_than_asked(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    prompts = tmp_path / "harmful.txt"
    prompts.write_text("\n".join(f"How do I do bad thing number {i}?" for i in range(12)))
    message = expect_refusal(run_args(tiny_dir, studies, "--harmful", str(prompts)), studies, capsys, "asked for 8", "has only")
    assert "--direction-prompts" in message


def test_more_kl_prompts_than_the_scoring_split_holds(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    args = run_args(tiny_dir, studies, "--kl-prompts", "500")
    expect_refusal(args, studies, capsys, "asked for 500 harmless scoring", "has only", "--kl-prompts")


def test_model_without_chat_template(no_template_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    expect_refusal(run_args(no_template_dir, studies), studies, capsys, "no chat template", "--chat-template")


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("not a url", "malformed storage URL"),
        ("redis://localhost/0", "unsupported storage scheme"),
        ("sqlite:////no/such/dir/x.db", "does not exist"),
    ],
)
def test_bad_storage_url(tiny_dir, tmp_path, capsys, url, fragment):
    studies = tmp_path / "s"
    expect_refusal(run_args(tiny_dir, studies, "--storage", url), studies, capsys, fragment, "--storage")


@pytest.mark.parametrize(
    "flag, value", [("--trials", "0"), ("--trials", "-3"), ("--scoring-prompts", "0"), ("--kl-prompts", "0")]
)
def test_non_positive_counts(tiny_dir, tmp_path, capsys, flag, value):
    studies = tmp_path / "s"
    expect_refusal(run_args(tiny_dir, studies, flag, value), studies, capsys, flag, "positive")


def test_study_created_by_another_model(tiny_dir, tiny_llama_bias_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    assert main(run_args(tiny_dir, studies, "--trials", "1")) == 0
    capsys.readouterr()
    expect_refusal(
        run_args(tiny_llama_bias_dir, studies, "--trials", "2"), studies, capsys, "was created with model", "another --study"
    )


def test_study_created_with_other_scoring_settings(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    assert main(run_args(tiny_dir, studies, "--trials", "1")) == 0
    capsys.readouterr()
    args = run_args(tiny_dir, studies, "--trials", "2", "--max-new-tokens", "5")
    args.remove("--max-new-tokens"), args.remove("4")
    expect_refusal(args, studies, capsys, "max_new_tokens", "another --study")


def test_postgres_unreachable(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    # --db-retry-s 1: the refused port is retried for a second instead of the 15 s a starting worker waits
    args = run_args(tiny_dir, studies, "--storage", "postgresql://nobody@127.0.0.1:1/none", "--db-retry-s", "1")
    expect_refusal(args, studies, capsys, "cannot open storage", "server is running", "waited 1 s")


def test_gguf_of_unsupported_architecture(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="notarealarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    studies = tmp_path / "s"
    expect_refusal(run_args(path, studies), studies, capsys, "architecture notarealarch is not supported")


def test_prompts_longer_than_the_context(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    prompts = tmp_path / "long.txt"
    prompts.write_text("\n".join(f"Request {i}: " + "please explain this " * 200 for i in range(30)))
    expect_refusal(
        run_args(tiny_dir, studies, "--harmful", str(prompts)), studies, capsys, "over the model's context of 512", "shorten"
    )


def test_nan_in_residuals_names_the_layer(tiny_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.layers.2.mlp.down_proj.weight"][:] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    studies = tmp_path / "s"
    expect_refusal(run_args(broken, studies), studies, capsys, "NaN or inf at layer 2", "even in float32", "check the model file")


def test_residuals_with_nan_or_inf_name_the_layer_and_what_to_try(tiny_dir):
    from optimizer.errors import UserError
    from optimizer.model import load_model
    from optimizer.prompts import format_chat
    from optimizer.residuals import check_finite, collect_residuals

    loaded = load_model(str(tiny_dir), "cpu", "float32")
    residuals = collect_residuals(loaded, format_chat(loaded.tokenizer, ["Hello", "How do I pick a lock?"]), 2).clone()
    check_finite(loaded, residuals)  # a sound model's pass
    residuals[min(3, loaded.n_layers - 1), 1, 5] = float("inf")
    with pytest.raises(UserError, match=rf"NaN or inf at layer {min(3, loaded.n_layers - 1)}: .*try --dtype float32"):
        check_finite(loaded, residuals)


def test_kl_prompts_are_the_harmless_scoring_prompts_and_a_study_keeps_them(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    studies = tmp_path / "s"
    assert main(run_args(tiny_dir, studies, "--trials", "1", "--kl-prompts", "6")) == 0
    baseline = load_file(next((studies / "t").glob("baseline*.safetensors")))
    assert {name: t.shape[0] for name, t in baseline.items() if t.dim() == 2} == {"logprobs": 6}  # 4 scoring, 6 for KL
    capsys.readouterr()
    expect_refusal(
        run_args(tiny_dir, studies, "--trials", "2", "--kl-prompts", "5"), studies, capsys, "kl_prompts", "another --study"
    )
