"""Settings defined once: the flags, the TOML keys and the help come from the Settings fields, and every way of
building settings (a run, a study's stored record) goes through the same checks."""

from __future__ import annotations

import dataclasses

import pytest

from optimizer.cli import build_parser, main
from optimizer.config import (
    DEFAULT_REFUSAL_MARKERS,
    FIELDS,
    Settings,
    bool_flag_for,
    build_settings,
    default_text,
    settings_from_record,
)
from optimizer.errors import UserError

FLAGGED = [name for name, f in FIELDS.items() if f.metadata.get("cli", True)]


def help_of(command: str, capsys) -> str:
    """`python -m optimizer COMMAND --help`, with argparse's line wrapping undone."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def settings_of(argv: list[str], toml: str | None, tmp_path) -> Settings:
    """Settings as `python -m optimizer run ARGV [--config FILE]` builds them."""
    if toml is not None:
        (tmp_path / "study.toml").write_text(toml)
        argv = [*argv, "--config", str(tmp_path / "study.toml")]
    args = build_parser().parse_args(["run", *argv])
    return build_settings({k: v for k, v in vars(args).items() if k not in ("command", "config")}, args.config)


def test_every_setting_with_a_flag_is_in_run_help_with_its_default(capsys):
    text = help_of("run", capsys)
    assert len(FLAGGED) == len(FIELDS) - 1  # refusal_markers is set in a TOML file only
    for name in FLAGGED:
        flag = "--" + name.replace("_", "-")
        help_line = " ".join(FIELDS[name].metadata["help"].split())
        assert f"{flag} " in text, flag
        assert f"{help_line} (default: {default_text(name)})" in text, name
    assert "--refusal-markers" not in text and "--config CONFIG" in text


def test_default_texts_show_the_field_defaults(capsys):
    text = help_of("run", capsys)
    for shown in (
        "(default: 200)",
        "(default: 4.0)",
        "(default: auto)",
        "(default: studies)",
        "(default: 0 = automatic)",
        "(default: the bundled Qwen2.5-Coder-0.5B-Instruct)",
        "(default: sqlite:///studies/<study>.db)",
        "(default: bfloat16 on CUDA, float32 on CPU)",
        "(default: both)",
        "(default: off)",
    ):
        assert shown in text, shown
    assert default_text("refusal_markers") == "the built-in list"
    assert default_text("trials") == str(Settings().trials) == "200"


def test_commands_on_a_study_keep_their_own_model_and_device_help(capsys):
    text = help_of("export", capsys)
    assert "--model MODEL where the study's model is now, if it moved (checked by fingerprint)" in text
    assert "--device DEVICE auto, cpu, cuda (default: the study's)" in text
    assert "--study STUDY study name (default: default)" in text
    show = help_of("show", capsys)
    assert "--storage STORAGE" in show and "--model" not in show


def test_commands_on_a_study_default_its_location():
    args = build_parser().parse_args(["show"])
    assert (args.study, args.storage, args.studies_dir) == ("default", None, "studies")
    args = build_parser().parse_args(["chat", "--trial", "2", "--studies-dir", "elsewhere"])
    assert (args.study, args.studies_dir, args.trial, args.model, args.device) == ("default", "elsewhere", 2, None, None)


@pytest.mark.parametrize(
    "name, cli, toml, from_cli, from_toml",
    [
        ("trials", ["--trials", "7"], "trials = 9", 7, 9),
        ("alpha_max", ["--alpha-max", "1.5"], "alpha_max = 2.5", 1.5, 2.5),
        ("no_thinking", ["--no-thinking"], "no_thinking = true", True, True),
        (
            "direction_methods",
            ["--direction-methods", "mean_diff"],
            'direction-methods = ["contrastive"]',
            ["mean_diff"],
            ["contrastive"],
        ),
        ("chat_template_kwargs", ["--chat-template-kwargs", '{"a": 1}'], "[chat_template_kwargs]\nb = 2", {"a": 1}, {"b": 2}),
    ],
)
def test_command_line_over_toml_over_default(tmp_path, name, cli, toml, from_cli, from_toml):
    default = getattr(Settings(), name)
    assert from_cli != default or name == "no_thinking"
    assert getattr(settings_of(cli, toml, tmp_path), name) == from_cli
    assert getattr(settings_of([], toml, tmp_path), name) == from_toml
    assert getattr(settings_of([], None, tmp_path), name) == default
    assert getattr(settings_of([], "", tmp_path), name) == default


def test_a_store_true_flag_wins_over_false_in_toml(tmp_path):
    assert settings_of(["--norm-preserving"], "norm_preserving = false", tmp_path).norm_preserving is True
    assert settings_of([], "norm_preserving = false", tmp_path).norm_preserving is False


def test_a_toml_only_setting(tmp_path):
    assert settings_of([], 'refusal_markers = ["nope"]', tmp_path).refusal_markers == ["nope"]
    assert settings_of([], None, tmp_path).refusal_markers == list(DEFAULT_REFUSAL_MARKERS)
    with pytest.raises(SystemExit):
        settings_of(["--refusal-markers", "nope"], None, tmp_path)


def test_settings_are_frozen():
    settings = build_settings({"trials": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.trials = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.chat_template_kwargs = {}


def test_the_chat_template_kwargs_text_is_parsed_into_a_new_object():
    settings = build_settings({"chat_template_kwargs": '{"enable_thinking": false}', "no_thinking": True})
    assert settings.chat_template_kwargs == {"enable_thinking": False}
    assert settings.template_kwargs() == {"enable_thinking": False}


def record_of(settings: Settings) -> dict:
    return dataclasses.asdict(settings)  # as `run` stores it in the study's `run_settings`


def test_a_record_gives_back_the_settings_it_was_made_from():
    settings = build_settings(
        {
            "study": "s",
            "studies_dir": "d",
            "trials": 12,
            "alpha_max": 1.0,
            "response_prefix": "</think>",
            "direction_methods": ["contrastive"],
            "chat_template_kwargs": '{"x": 1}',
        }
    )
    assert settings_from_record(record_of(settings), study="s", studies_dir="d") == settings


def test_a_record_ignores_unknown_keys_and_old_records_mean_no_prefix():
    record = {k: v for k, v in record_of(Settings(trials=5)).items() if k != "response_prefix"}
    record["a_setting_from_a_later_version"] = 1
    settings = settings_from_record(record, study="s")
    assert settings.trials == 5 and settings.response_prefix == "" and settings.study == "s"


def test_a_boolean_setting_is_asked_for_by_the_flag_its_default_gives():
    assert bool_flag_for("projected_directions", True) == "with --projected-directions"
    assert bool_flag_for("projected_directions", False) == "without --projected-directions"  # off by default: no --no- flag
    assert bool_flag_for("seeded_starts", False) == "with --no-seeded-starts"  # on by default
    assert bool_flag_for("seeded_starts", True) == "with --seeded-starts"


def test_a_record_takes_the_location_from_the_command_line_and_skips_none():
    record = record_of(Settings(study="old", storage="postgresql://user:***@host/db", studies_dir="old_dir", device="cuda"))
    settings = settings_from_record(record, study="new", storage=None, studies_dir="here", device=None, model="moved")
    assert (settings.study, settings.storage, settings.studies_dir) == ("new", None, "here")
    assert settings.storage_url() == "sqlite:///here/new.db"
    assert settings.device == "cuda" and settings.model == "moved"
    with pytest.raises(TypeError):
        settings_from_record(record, no_such_setting=1)


@pytest.mark.parametrize(
    "name, value",
    [
        ("trials", 0),
        ("scoring_prompts", -1),
        ("trials", "5"),
        ("dtype", "int8"),
        ("direction_methods", []),
        ("direction_scopes", ["both"]),
        ("chat_template_kwargs", "[1]"),
        ("tpe_bandwidth", "wide"),
        ("tpe_weights", "equal"),
        ("tpe_kl_scale", "log"),
        ("sampler", "cmaes"),
        ("quantization", "8bit"),
        ("winsorize", 1.5),
        ("searched_winsorize", 0.3),
        ("front_fill", -1),
        ("kl_prompts", 0),
    ],
)
def test_a_bad_record_is_refused_like_a_bad_run(name, value):
    with pytest.raises(UserError) as from_run:
        build_settings({name: value})
    record = {**record_of(Settings()), name: value}
    with pytest.raises(UserError) as from_record:
        settings_from_record(record, study="s")
    assert str(from_record.value) == str(from_run.value)
    assert str(from_run.value)  # a message that names the problem


def test_a_bad_override_is_refused_too():
    with pytest.raises(UserError, match="--dtype takes auto or float32"):
        settings_from_record(record_of(Settings()), study="s", dtype="float8")


def test_a_study_from_before_the_projection_was_searched_replays_without_it():
    """Records written before --searched-projection existed (on by default now) mean it off, so their
    trials, which have no `projection` parameter, replay as they ran."""
    record = record_of(Settings())
    del record["searched_projection"]
    assert settings_from_record(record, study="s").searched_projection is False
    assert Settings().searched_projection is True
