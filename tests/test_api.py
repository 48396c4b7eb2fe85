"""The Python API: ``import shardsmith`` is light, exposes every job as a function, and raises the
CLI's own one-line errors as exceptions (the same validation, before any work)."""

import inspect
import os
import subprocess
import sys

import pytest

import shardsmith

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_is_light_and_lists_the_jobs():
    code = ("import sys, shardsmith; print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'fsspec', 'open_clip') "
            "if m in sys.modules)); print(shardsmith.__all__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT})
    heavy, names = r.stdout.splitlines()
    assert heavy == "[]", heavy
    for job in ("curate", "download", "generate", "augment", "recurate", "report"):
        assert job in names
        fn = getattr(shardsmith, job)
        assert callable(fn) and fn.__doc__ and "config" in inspect.signature(fn).parameters or job == "report"
    assert issubclass(shardsmith.ConfigError, shardsmith.ShardsmithError)


def _cli_errors(cases: list[list], cwd) -> list[str]:
    """Each command's one-line error (exit 2), the commands run at once (each is a new process)."""
    procs = [subprocess.Popen([sys.executable, "-m", "shardsmith", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ""}) for args in cases]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, err
        errors.append(err.strip().split(": error: ", 1)[1])
    return errors


def test_same_errors_as_the_cli(tmp_path):
    (tmp_path / "bad.yaml").write_text("batch_size: many\n")
    cases = [
        (lambda: shardsmith.curate(str(tmp_path / "none/00000.tar"), str(tmp_path / "o")), shardsmith.InputError,
         ["curate", tmp_path / "none/00000.tar", tmp_path / "o"]),
        (lambda: shardsmith.curate(str(tmp_path), str(tmp_path / "o"), config=str(tmp_path / "bad.yaml")),
         shardsmith.ConfigError, ["curate", tmp_path, tmp_path / "o", "--config", tmp_path / "bad.yaml"]),
        (lambda: shardsmith.curate(str(tmp_path), str(tmp_path / "o"), rules=["aesthetic >> 5"]),
         shardsmith.ConfigError, ["curate", tmp_path, tmp_path / "o", "--rule", "aesthetic >> 5"]),
        (lambda: shardsmith.download(str(tmp_path / "none.parquet"), str(tmp_path / "o")), shardsmith.InputError,
         ["download", tmp_path / "none.parquet", tmp_path / "o"]),
        (lambda: shardsmith.augment(str(tmp_path / "none.tar"), str(tmp_path / "o"), model="x", strength=2.0),
         shardsmith.ConfigError, ["augment", tmp_path / "none.tar", tmp_path / "o", "--model", "x", "--strength", "2"]),
        (lambda: shardsmith.generate(None, str(tmp_path / "o"), model="x"), shardsmith.ConfigError,
         ["generate", tmp_path / "o", "--model", "x"]),
        (lambda: shardsmith.recurate(str(tmp_path / "none"), str(tmp_path / "o")), shardsmith.InputError,
         ["recurate", tmp_path / "none", tmp_path / "o"]),
        (lambda: shardsmith.report(str(tmp_path / "none")), shardsmith.ShardsmithError,
         ["report", tmp_path / "none"]),
    ]
    from shardsmith.errors import one_line

    cli = _cli_errors([args for _, _, args in cases], cwd=tmp_path)
    for (call, kind, cli_args), cli_error in zip(cases, cli):
        with pytest.raises(kind) as e:
            call()
        # the same message; a config file is named as the caller gave it (--config FILE / config=FILE)
        assert one_line(e.value) == cli_error.replace("--config ", "config "), cli_args


def test_config_object_mapping_file_and_keywords(tmp_path):
    from shardsmith.jobs.api import _config
    from shardsmith.pipelines.config import CurateConfig

    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 8\npreset: none\nrules: ['min_side >= 64']\n")
    from_file = _config(CurateConfig, str(f), {"batch_size": 4}, input="in", output="out")
    assert (from_file.batch_size, from_file.preset, from_file.rules, from_file.input) == (4, "none", ["min_side >= 64"], "in")
    obj = _config(CurateConfig, CurateConfig(batch_size=2), {}, input="in", output="out")
    assert obj.batch_size == 2 and _config(CurateConfig, {"batch_size": 3}, {}).batch_size == 3
    with pytest.raises(shardsmith.ConfigError, match="arguments: unknown key 'batchsize'"):
        _config(CurateConfig, None, {"batchsize": 3})
    with pytest.raises(TypeError, match="expected a CurateConfig, a mapping or a YAML path"):
        _config(CurateConfig, 42, {})
