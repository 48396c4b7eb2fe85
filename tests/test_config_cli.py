import os
import subprocess
import sys

import pytest
import yaml

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


JOB_ARGS = {  # positional arguments, a flag, a config file's keys, and the config keys they set
    "curate": (["in", "out"], ["--batch-size", "8"], {"batch_size": 4, "preset": "none"},
               {"batch_size": 8, "preset": None}),
    "download": (["in", "out"], ["--fetch-threads", "3"], {"fetch_threads": 5, "urls_per_shard": 7},
                 {"fetch_threads": 3, "urls_per_shard": 7}),
    "generate": (["p.csv", "out"], ["--steps", "3", "--quiet"], {"model": "sd", "defaults": {"num_inference_steps": 9, "seed": 4}},
                 {"model": "sd", "defaults.num_inference_steps": 3, "defaults.seed": 4, "progress": False}),
    "augment": (["in", "out"], ["--strength", "0.3"], {"model": "sd", "strength": 0.9, "variants": 2, "size": [64, 64]},
                {"strength": 0.3, "variants": 2, "size": (64, 64)}),
    "recurate": (["run", "out"], ["--rule", "aesthetic >= 6"], {"rules": ["pwatermark < 0.5"], "report": False},
                 {"rules": ["pwatermark < 0.5", "aesthetic >= 6"], "report": False}),
    "report": (["out"], ["--per-grid", "3"], {"per_grid": 5}, {"per_grid": 3}),
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("job", list(JOB_ARGS))
def test_every_job_takes_a_config_file_and_flags_win(job, tmp_path):
    from shardsmith.jobs.cli import load

    positional, flags, data, expect = JOB_ARGS[job]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    args = build_parser(only=job).parse_args([job, *positional, "--config", str(f), *flags])
    cfg = load(job).config_from_args(args)
    for key, value in expect.items():
        assert _get(cfg, key) == value, (key, _get(cfg, key))
    f.write_text(yaml.safe_dump({**data, "presett": 1}))
    with pytest.raises(ConfigError, match="unknown key 'presett'"):
        load(job).config_from_args(build_parser(only=job).parse_args([job, *positional, "--config", str(f)]))


@pytest.mark.parametrize("job", list(JOB_ARGS))
def test_config_show_prints_a_config_file_the_job_reads_back(job, tmp_path):
    from shardsmith.jobs.cli import load
    from shardsmith.jobs.config import job_config
    from shardsmith.pipelines.config.base import to_dict

    positional, flags, data, expect = JOB_ARGS[job]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "shardsmith", "config", "show", job, "--config", str(f), *flags],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    cfg, validated = job_config(job, ["--config", str(f), *flags])
    assert shown == to_dict(cfg) and not validated
    for key, value in expect.items():  # the file's keys and the flags are in it, the rest are the defaults
        node = shown
        for part in key.split("."):
            node = node[part]
        assert node == (list(value) if isinstance(value, tuple) else value), key
    g = tmp_path / "shown.yaml"
    g.write_text(r.stdout)  # what it printed is a config the job takes as it is
    again = load(job).config_from_args(build_parser(only=job).parse_args([job, *positional, "--config", str(g)]))
    assert to_dict(again) == {**to_dict(cfg), **{k: v for k, v in to_dict(again).items()
                                               if k in ("input", "output", "run", "prompts")}}


def test_config_show_refuses_what_the_job_refuses(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: many\n")
    r = subprocess.run([sys.executable, "-m", "shardsmith", "config", "show", "curate", "--config", str(f)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (f"shardsmith config: error: --config {f}: batch_size: "
                                                      "expected int, got str 'many'"), r.stderr
    r = subprocess.run([sys.executable, "-m", "shardsmith", "config", "show", "inspect"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "not a job with a config" in r.stderr
