import os
import subprocess
import sys

import pytest

from shardsmith.jobs.cli import COMMANDS, build_parser
from shardsmith.jobs.curate import config_from_args
from shardsmith.pipelines.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    return build_parser().parse_args(["curate", *argv])


def test_yaml_config_with_flag_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("preset: sd-improved-aesthetics\nrules: ['caption_length >= 3']\nbatch_size: 8\n")
    cfg = config_from_args(parse(["in", "out", "--config", str(cfg_file), "--batch-size", "4", "--rule", "has url"]))
    assert cfg.batch_size == 4
    assert cfg.all_rules() == ["min_side >= 512", "aesthetic > 5.0", "pwatermark < 0.5", "caption_length >= 3", "has url"]


@pytest.mark.parametrize("text,match", [
    ("presett: x\n", "unknown key 'presett'"),
    ("batch_size: many\n", "batch_size: expected int"),
    ("rules: 'aesthetic >= 5'\n", "rules: expected a list"),
    ("rules: ['punsafe < 2']\n", "outside the range of punsafe"),
    ("batch_size: 0\n", "batch_size: must be >= 1"),
    ("device: tpu\n", "device:"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_configs_are_rejected_naming_the_key(tmp_path, text, match):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=match):
        config_from_args(parse(["in", "out", "--config", str(cfg_file)]))


def test_yaml_is_loaded_safely(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_from_args(parse(["in", "out", "--config", str(cfg_file)]))


def test_every_command_has_help():
    for name in COMMANDS:
        r = subprocess.run([sys.executable, "-m", "shardsmith.jobs.cli", name, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "usage:" in r.stdout, name
    r = subprocess.run([sys.executable, "-m", "shardsmith.jobs.curate", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--clip-pretrained" in r.stdout


def test_cli_error_exit_code_and_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "shardsmith.jobs.cli", "curate", str(tmp_path / "none-*.tar"), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "no input files found" in r.stderr and "Traceback" not in r.stderr
