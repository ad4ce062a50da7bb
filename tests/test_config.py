"""Configs: field docstrings become --help, YAML < CLI precedence, clear errors."""

import argparse

import pytest

from posttrain.config import add_dataclass_args, config_from_args, field_docs
from posttrain.errors import PosttrainError
from posttrain.evaluation import EvalConfig


def test_every_config_field_is_documented():
    import dataclasses

    from posttrain.pipeline.stages import PipelineConfig
    from posttrain.trainers.pretrain import PretrainConfig
    from posttrain.trainers.rl import RLConfig
    from posttrain.trainers.sft import SFTConfig

    for cls in (EvalConfig, SFTConfig, RLConfig, PretrainConfig, PipelineConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def _parse(argv, cfg_file=None):
    p = argparse.ArgumentParser()
    add_dataclass_args(p, EvalConfig)
    return config_from_args(EvalConfig, p.parse_args(argv), cfg_file)


def test_yaml_then_cli_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("limit: 5\nbatch_size: 8\nstop: ['Q:']\n")
    cfg = _parse(["--batch-size", "2"], str(f))
    assert (cfg.limit, cfg.batch_size, cfg.stop) == (5, 2, ["Q:"])
    assert _parse([]).batch_size == 16


def test_config_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("limt: 5\n")
    with pytest.raises(PosttrainError, match="unknown option.*limt"):
        _parse([], str(f))
    f.write_text("batch_size: lots\n")
    with pytest.raises(PosttrainError, match="batch_size expects int"):
        _parse([], str(f))
    f.write_text("a: [1\n")
    with pytest.raises(PosttrainError, match="invalid YAML"):
        _parse([], str(f))
    with pytest.raises(PosttrainError, match="not found"):
        _parse([], str(tmp_path / "nope.yaml"))


def test_shared_options_are_declared_once_with_each_commands_defaults_and_wording():
    """A field declared in a base record keeps its docstring in every config that inherits it; a
    config that sets its own default inherits the text, one that redeclares with a docstring or names
    the field in ``HELP`` gets its own wording."""
    import dataclasses

    from posttrain.config import StageOptions
    from posttrain.trainers.rl import RLConfig
    from posttrain.trainers.run import RunOptions
    from posttrain.trainers.setup import TrainerOptions
    from posttrain.trainers.sft import SFTConfig

    for cls in (RLConfig, SFTConfig):
        own = {n for n in vars(cls).get("__annotations__", {})}
        assert {"output", "max_steps", "learning_rate", "save_steps", "eval_steps"} <= own  # each trainer's defaults
        assert issubclass(cls, RunOptions) and issubclass(cls, StageOptions)
    assert "learning_rate" not in RunOptions.__dataclass_fields__ and "save_steps" in RunOptions.__dataclass_fields__
    assert "learning_rate" in TrainerOptions.__dataclass_fields__
    rl, sft, ev = field_docs(RLConfig), field_docs(SFTConfig), field_docs(EvalConfig)
    assert rl["learning_rate"] == sft["learning_rate"] == "Peak learning rate."  # the base's docstring, inherited
    assert rl["save_steps"] == "Checkpoint every N steps (0 disables)."
    assert sft["save_steps"] == "Checkpoint every N steps (0 disables); the seed's 250."  # redeclared with its own
    assert ev["model"] == "Hub id or local folder of the model to evaluate."  # EvalConfig.HELP
    assert rl["model"].startswith("Model to train") and ev["task"] == rl["task"] == field_docs(StageOptions)["task"]
    defaults = {c: {f.name: f.default for f in dataclasses.fields(c)} for c in (RLConfig, SFTConfig)}
    assert (defaults[RLConfig]["learning_rate"], defaults[SFTConfig]["learning_rate"]) == (1e-5, 2e-4)
    assert (defaults[RLConfig]["save_steps"], defaults[SFTConfig]["save_steps"]) == (100, 250)
    with pytest.raises(TypeError):
        TrainerOptions()  # the shared record leaves per-trainer defaults to the trainers


def _sft(tmp_path, text):
    from posttrain.trainers.sft import SFTConfig

    f = tmp_path / "c.yaml"
    f.write_text(text)
    p = argparse.ArgumentParser()
    add_dataclass_args(p, SFTConfig)
    return config_from_args(SFTConfig, p.parse_args([]), str(f))


@pytest.mark.parametrize("text,message", [
    ('trust_remote_code: "false"\n', "option trust_remote_code expects true or false, got the text 'false'; write the value without quotes"),
    ("trust_remote_code: no\n", "option trust_remote_code expects true or false, got the text 'no'"),
    ("resume: 'no'\n", "option resume expects true or false"),
    ("resume: 1\n", "option resume expects true or false, got 1 (a number)"),
    ("train_limit: 2.9\n", "option train_limit expects int (a whole number) or null, got 2.9 (a number); give a whole number"),
    ("lora_r: '8'\n", "option lora_r expects int (a whole number), got the text '8'; write the value without quotes"),
    ("learning_rate: fast\n", "option learning_rate expects a number, got the text 'fast'"),
    ("learning_rate: true\n", "option learning_rate expects a number, got true (a boolean)"),
    ("learning_rate: .nan\n", "option learning_rate must be a finite number"),
    ("output: 2024\n", "option output expects text, got 2024 (a number); put the value in quotes"),
    ("report_to: {tensorboard: 1}\n", "option report_to expects a list of text"),
    ("lora_target_modules: [q_proj, 5]\n", "option lora_target_modules expects a list of text or null, got ['q_proj', 5]"),
    ("learning_rate: 1.0e-4\nlora_r: 4\nlearning_rate: 1.0e-3\n", "c.yaml:3: option learning_rate is given twice in the same mapping; keep one"),
])
def test_yaml_values_are_checked_by_their_fields_type(tmp_path, text, message):
    with pytest.raises(PosttrainError) as e:
        _sft(tmp_path, text)
    assert message in str(e.value) and str(tmp_path / "c.yaml") in str(e.value) and "\n" not in str(e.value)


def test_yaml_values_convert_where_the_meaning_is_plain(tmp_path):
    cfg = _sft(tmp_path, "learning_rate: 1e-5\nweight_decay: 0\nmax_steps: 3.0\ntrain_limit: null\nresume: false\n"
                         "report_to: tensorboard\nlora_target_modules: [q_proj]\ntrust_remote_code: true\nseed: 010\n")
    assert cfg.learning_rate == 1e-5 and type(cfg.weight_decay) is float and cfg.max_steps == 3 and type(cfg.max_steps) is int
    assert cfg.train_limit is None and cfg.resume is False and cfg.report_to == ["tensorboard"] and cfg.trust_remote_code is True
    assert cfg.seed == 10  # YAML 1.2: a leading zero is not octal
    assert _sft(tmp_path, "task: 'no'\n").task == "no"  # text stays text


def test_an_eval_yaml_with_a_number_for_its_stop_strings(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("stop: 5\n")
    with pytest.raises(PosttrainError, match="option stop expects a list of text or null, got 5"):
        _parse([], str(f))
    f.write_text("stop: 'Q:'\n")
    assert _parse([], str(f)).stop == ["Q:"]


def test_nested_duplicate_keys_and_literal_choices(tmp_path):
    import dataclasses
    from typing import Literal

    from posttrain.config import build_config, load_yaml

    f = tmp_path / "p.yaml"
    f.write_text("sft:\n  max_steps: 3\n  max_steps: 4\n")
    with pytest.raises(PosttrainError, match="p.yaml:3: option max_steps is given twice"):
        load_yaml(f)

    @dataclasses.dataclass
    class C:
        kind: Literal["a", "b"] = "a"
        """Which."""
        size: Literal[1, 2] | None = None
        """How big."""

    assert build_config(C, {"kind": "b", "size": 2}) == C("b", 2)
    with pytest.raises(PosttrainError, match="option kind expects one of a, b, got the text 'c'"):
        build_config(C, {"kind": "c"})
    with pytest.raises(PosttrainError, match="option size expects one of 1, 2 or null"):
        build_config(C, {"size": True})
    p = argparse.ArgumentParser()
    add_dataclass_args(p, C)
    with pytest.raises(SystemExit):
        p.parse_args(["--kind", "c"])
    assert p.parse_args(["--kind", "b", "--size", "2"]).size == 2
