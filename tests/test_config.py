"""Configs: field docstrings become --help, YAML < CLI precedence, clear errors."""

import argparse

import pytest

from posttrain.config import add_dataclass_args, config_from_args, field_docs
from posttrain.errors import PosttrainError
from posttrain.evaluation import EvalConfig


def test_every_config_field_is_documented():
    import dataclasses

    from posttrain.pipeline import PipelineConfig
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
