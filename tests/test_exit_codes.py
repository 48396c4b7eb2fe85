"""Every job's bad input or bad configuration: exit code 2 and one line naming what is wrong, no
traceback (run as a user would, ``python -m shardsmith ...``)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shardsmith(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "shardsmith", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=180)


@pytest.fixture
def bad(tmp_path):
    (tmp_path / "bad.yaml").write_text("presett: none\n")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "prompts.csv").write_text("prompt\na red bicycle\n")
    return tmp_path


CASES = {
    "curate: missing input": (["curate", "{d}/none/00000.tar", "{d}/out"], "none/00000.tar: input file not found"),
    "curate: unknown config key": (["curate", "{d}/none", "{d}/out", "--config", "{d}/bad.yaml"],
                                   "unknown key 'presett'"),
    "curate: bad rule": (["curate", "{d}/none", "{d}/out", "--rule", "aesthetic >> 5"], "rule 'aesthetic >> 5'"),
    "curate: bad head flag": (["curate", "{d}/none", "{d}/out", "--head", "pcartoon"], "expected NAME=ARCH:PATH"),
    "download: missing input": (["download", "{d}/none.parquet", "{d}/out"], "none.parquet: input file not found"),
    "download: unknown config key": (["download", "{d}/none", "{d}/out", "--config", "{d}/bad.yaml"],
                                     "unknown key 'presett'"),
    "generate: missing prompt table": (["generate", "{d}/none.parquet", "{d}/out", "--model", "{d}"],
                                       "none.parquet: prompt table not found"),
    "generate: missing model": (["generate", "{d}/prompts.csv", "{d}/out", "--model", "{d}/nomodel"],
                                "nomodel: no such directory"),
    "generate: not a model folder": (["generate", "{d}/prompts.csv", "{d}/out", "--model", "{d}"],
                                     "not a diffusers pipeline directory (no model_index.json)"),
    "generate: neither prompts nor captions": (["generate", "{d}/out", "--model", "x"], "give a PROMPTS table"),
    "augment: missing input": (["augment", "{d}/none.tar", "{d}/out", "--model", "{d}/nomodel"],
                               "none.tar: input file not found"),
    "augment: bad strength": (["augment", "{d}/none.tar", "{d}/out", "--model", "x", "--strength", "2"],
                              "strength: 2.0 must be in (0, 1]"),
    "dedup: not a curate output": (["dedup", "{d}/none", "{d}/out"], "none: not a finished curate OUTPUT"),
    "dedup: unknown config key": (["dedup", "{d}/none", "{d}/out", "--config", "{d}/bad.yaml"], "unknown key 'presett'"),
    "dedup: unknown method": (["dedup", "{d}/none", "{d}/out", "--methods", "exact,fuzzy"], "methods: 'fuzzy'"),
    "report: not a run": (["report", "{d}/none"], "no such folder"),
    "report: unknown config key": (["report", "{d}/none", "--config", "{d}/bad.yaml"], "unknown key 'presett'"),
    "generate: unknown config key": (["generate", "{d}/prompts.csv", "{d}/out", "--config", "{d}/bad.yaml"],
                                     "unknown key 'presett'"),
    "augment: unknown config key": (["augment", "{d}/none.tar", "{d}/out", "--config", "{d}/bad.yaml"],
                                    "unknown key 'presett'"),
    "recurate: not a run": (["recurate", "{d}/none", "{d}/out"], "no manifest.json"),
    "recurate: unknown config key": (["recurate", "{d}/none", "{d}/out", "--config", "{d}/bad.yaml"],
                                     "unknown key 'presett'"),
    "config: not a job": (["config", "show", "inspect"], "not a job with a config"),
    "inspect: no such file": (["inspect", "{d}/none.parquet"], "no such file or folder"),
    "sample-data: a file as DIR": (["sample-data", "{d}/a-file"], "cannot write the sample dataset"),
    "submit: no job": (["submit", "--address", "http://127.0.0.1:9"], "no job given"),
    "curate: unknown predictor": (["curate", "{d}/none", "{d}/out", "--head", "pcartoon=no-such-predictor"],
                                  "heads.pcartoon: unknown predictor 'no-such-predictor'"),
    "curate: bad predictor pin": (["curate", "{d}/none", "{d}/out", "--predictor-sha256", "laion-aesthetic-v2=abc"],
                                  "expected NAME=HEX (64 hex digits)"),
    "predictors: unknown name": (["predictors", "fetch", "no-such"], "unknown predictor 'no-such'"),
    "convert-predictor: missing file": (["convert-predictor", "{d}/none.zip", "{d}/out.safetensors"],
                                        "none.zip: file not found"),
    "convert-predictor: not a zip": (["convert-predictor", "{d}/a-file", "{d}/out.safetensors"],
                                     "neither a zip nor a SavedModel folder"),
    "fit-head: missing labels": (["fit-head", "{d}/run", "{d}/none.parquet", "{d}/head.safetensors"],
                                 "none.parquet: file not found"),
    "fit-head: bad task": (["fit-head", "--images", "{d}", "{d}/h", "--folds", "1"], "--folds: must be in [2, 100]"),
    "make-watermark-data: no input": (["make-watermark-data", "{d}/none", "{d}/out"], "none: no such file or folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_or_config_exits_2_with_one_line(case, bad):
    args, needle = CASES[case]
    r = shardsmith(*[a.format(d=bad) for a in args], cwd=bad)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"shardsmith {args[0]}: error: ") and needle in lines[0], lines[0]
