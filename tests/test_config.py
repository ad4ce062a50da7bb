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
