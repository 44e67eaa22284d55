"""The run config: YAML files, dotted overrides, and the table of mistakes that must each
stop the run with one clear error before any work starts."""

from __future__ import annotations

import pytest

from tessera.cli import main
from tessera.distill.run_config import (
    RunConfig,
    load_run_config,
    parse_override,
    run_fingerprint,
)
from tessera.errors import ConfigError

from .conftest import TINY_YAML
from .helpers import REPO


def test_quickstart_yaml_spells_out_the_defaults():
    assert load_run_config(REPO / "configs" / "quickstart.yaml") == RunConfig()
    assert load_run_config(None) == RunConfig()


def test_quickstart_is_every_other_teacher_layer_on_the_stdlib():
    config = RunConfig()
    assert config.teacher == "smollm2-135m-instruct"
    assert config.data.corpus == ["python-stdlib"]
    assert config.student.keep_every == 2 and config.student.layers is None


def test_overrides_are_typed():
    config = load_run_config(TINY_YAML, [
        "trainer.max_steps=20", "output_dir=runs/x", "trainer.lr=1e-4", "loss.temperature=2",
        "trainer.shuffle=false", "student.layers=[0, 1]", "loss.loss=jsd",
        "loss.layer_map={1: 2}", "data.shard_dir=null"])
    assert config.trainer.max_steps == 20 and config.output_dir == "runs/x"
    assert config.trainer.lr == 1e-4 and isinstance(config.loss.temperature, float)
    assert config.trainer.shuffle is False and config.student.layers == [0, 1]
    assert config.loss.loss == "jsd" and config.loss.layer_map == {1: 2}
    assert config.data.shard_dir is None


def test_fingerprint_ignores_where_and_how_often_but_not_what():
    base = RunConfig()
    same = load_run_config(None, ["output_dir=elsewhere", "trainer.checkpoint_every=5",
                                  "trainer.progress=false"])
    other = load_run_config(None, ["trainer.lr=1e-3"])
    assert run_fingerprint(base) == run_fingerprint(same)
    assert run_fingerprint(base) != run_fingerprint(other)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_step=3"], r"unknown config key 'trainer.max_step'.*'trainer.max_steps'"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["trainer.max_steps=abc"], "'trainer.max_steps' must be an integer"),
    (["trainer.max_steps=2.5"], "'trainer.max_steps' must be an integer"),
    (["trainer.max_steps=true"], "'trainer.max_steps' must be an integer"),
    (["trainer.lr=fast"], "'trainer.lr' must be a number"),
    (["trainer.shuffle=1"], "'trainer.shuffle' must be true or false"),
    (["data.corpus=python-stdlib"], "'data.corpus' must be a list"),
    (["trainer=3"], "trainer must be a mapping"),
    (["trainer.max_steps"], "not of the form key=value"),
    (["trainer.max_steps=0"], "trainer.max_steps must be a positive integer"),
    (["trainer.global_batch_size=3"], "multiple of trainer.micro_batch_size"),
    (["loss.loss=kl"], "unknown distillation loss"),
    (["student.preset=student-tiny"], "set the other pair to null"),
    (["data.val_fraction=0"], r"val_fraction must be in \(0, 1\)"),
    (["trainer.device=tpu"], "trainer.device must be one of"),
])
def test_bad_overrides_fail_with_one_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(TINY_YAML, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(bad)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=") == ("a", "")
    assert parse_override("path=runs/x=y") == ("path", "runs/x=y")


# --------------------------------------------------------------------------- CLI table
def _cli_error(capsys, args: list[str]) -> str:
    code = main(["distill", "--config", str(TINY_YAML), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("tessera: error: "), err
    return err[0]


def test_cli_unknown_key_and_wrong_type(capsys, overrides, tmp_path):
    out = tmp_path / "run"
    assert "unknown config key 'trainer.lrr'" in _cli_error(capsys, [*overrides(out),
                                                                      "trainer.lrr=1"])
    assert "must be an integer" in _cli_error(capsys, [*overrides(out),
                                                       "trainer.max_steps=many"])
    assert not out.exists()  # nothing was written


def test_cli_empty_corpus(capsys, overrides, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    shards = tmp_path / "shards-empty"
    message = _cli_error(capsys, [*overrides(tmp_path / "run"), f"data.corpus=['{empty}']",
                                  f"data.shard_dir={shards}"])
    assert "no non-empty document" in message
    assert not shards.exists()  # failed before tokenizing anything


def test_cli_missing_corpus(capsys, overrides, tmp_path):
    message = _cli_error(capsys, [*overrides(tmp_path / "run"),
                                  f"data.corpus=['{tmp_path / 'nowhere'}']"])
    assert "matches no files" in message


def test_cli_vocab_mismatch(capsys, overrides, tmp_path):
    out = tmp_path / "run"
    message = _cli_error(capsys, [*overrides(out), "student.layers=null",
                                  "student.preset=student-tiny"])
    assert "vocabulary (49152 tokens) differs from the teacher's (320)" in message
    assert not out.exists()  # the directory is not claimed by a run that never started


def test_cli_output_dir_of_a_different_run(capsys, overrides, tmp_path, run_tiny):
    out = tmp_path / "run"
    run_tiny(out, trainer__max_steps=2, eval__num_sequences=2)
    message = _cli_error(capsys, [*overrides(out), "trainer.max_steps=2",
                                  "eval.num_sequences=2", "trainer.lr=0.5"])
    assert f"output_dir {out} holds a different run" in message and "trainer.lr" in message
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "holds no Tessera run" in _cli_error(capsys, overrides(foreign))
