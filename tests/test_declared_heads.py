"""Heads declared by the user, with no code: a config entry becomes a score column that rules,
the report and ``inspect`` use, with values equal to a reference computation written here."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import read_scores

from shardsmith.errors import ConfigError
from shardsmith.jobs.curate import config_from_args
from shardsmith.pipelines.flows.curate import run_curate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(*argv):
    from shardsmith.jobs.cli import build_parser

    return build_parser().parse_args(["curate", *argv])


@pytest.fixture(scope="module")
def cartoon_head(tmp_path_factory, tiny_models):
    """An ``nn.Linear(64, 1)`` state dict made here, the layout of LAION's v1 linear heads."""
    torch.manual_seed(11)
    lin = torch.nn.Linear(64, 1)
    path = tmp_path_factory.mktemp("heads") / "cartoon-tiny.pth"
    torch.save(lin.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def declared_run(ray_local, tiny_models, sample, cartoon_head, tmp_path_factory):
    d = tmp_path_factory.mktemp("declared")
    cfg_file = d / "curate.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "clip_model": tiny_models["clip_model"], "clip_pretrained": tiny_models["clip_pretrained"],
        "preset": "none", "heads": {"pcartoon": {"arch": "linear", "weights": cartoon_head}},
        "rules": ["pcartoon < 0.05"], "batch_size": 16, "precision": "fp32"}))
    out = d / "out"
    cfg = config_from_args(_args(sample["images"], str(out), "--config", str(cfg_file), "--quiet"))
    stats = run_curate(cfg, log=lambda *a: None)
    return out, stats


def _reference_scores(tiny_models, head_path, sample) -> dict[str, float]:
    """open_clip's own preprocess and encode_image, L2-normalised, then x @ W.T + b."""
    import open_clip
    from PIL import Image

    open_clip.add_model_config(tiny_models["clip_model"])
    name = os.path.basename(tiny_models["clip_model"])[:-5]
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tiny_models["clip_pretrained"])
    model.eval()
    sd = torch.load(head_path, weights_only=True)
    out = {}
    with tarfile.open(sample["shards"][0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for member, data in members.items():
        key, ext = member.split(".", 1)
        if ext not in ("jpg", "png", "webp"):
            continue
        try:
            img = Image.open(io.BytesIO(data))
            x = preprocess(img).unsqueeze(0)
        except Exception:
            continue  # the broken samples
        with torch.no_grad():
            e = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            out[key] = float((e @ sd["weight"].T + sd["bias"]).item())
    return out


def test_declared_head_is_a_column_equal_to_a_reference(declared_run, tiny_models, cartoon_head, sample):
    out, stats = declared_run
    scores = read_scores(out)
    assert "pcartoon" in scores.column_names
    ref = _reference_scores(tiny_models, cartoon_head, sample)
    got = {r["key"]: r["pcartoon"] for r in scores.to_pylist() if r["status"] != "error"}
    common = sorted(set(ref) & set(got))
    assert len(common) >= 10
    np.testing.assert_allclose([got[k] for k in common], [ref[k] for k in common], rtol=0, atol=1e-4)


def test_rule_on_the_declared_head_drops_rows_and_is_counted(declared_run):
    out, stats = declared_run
    rows = read_scores(out).to_pylist()
    dropped = [r for r in rows if r["status"] == "dropped"]
    assert dropped and all(r["reason"] == "pcartoon<0.05" and r["pcartoon"] >= 0.05 for r in dropped)
    kept = [r for r in rows if r["status"] == "kept"]
    assert kept and all(r["pcartoon"] < 0.05 for r in kept)
    assert stats["dropped_by_reason"] == {"pcartoon<0.05": len(dropped)}
    assert "pcartoon" in stats["scores_computed"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["models"]["heads"]["pcartoon"]["arch"] == "linear"
    assert "pcartoon" in [s["name"] for s in manifest["models"]["scores"]]
    assert manifest["fingerprint"]["heads"]["pcartoon"]["weights"].endswith("cartoon-tiny.pth")
    curated = pq.read_table(os.path.join(out, "curated", "00000.parquet"))
    assert "pcartoon" in curated.column_names


def test_declared_head_in_report_and_inspect(declared_run):
    from shardsmith.pipelines.report import build_report

    out, _ = declared_run
    build_report(str(out))
    assert os.path.exists(os.path.join(out, "report", "hist_pcartoon.png"))
    assert "Borderline around pcartoon&lt;0.05" in open(os.path.join(out, "report.html")).read()
    r = subprocess.run([sys.executable, "-m", "shardsmith.jobs.cli", "inspect", str(out), "--shard", "00000",
                        "--sort", "pcartoon"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[1]
    assert "pcartoon" in header


def test_a_rerun_with_the_head_changed_is_refused(declared_run, tiny_models, sample, tmp_path):
    out, _ = declared_run
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(64, 1).state_dict(), other)
    cfg = config_from_args(_args(sample["images"], str(out), "--preset", "none", "--clip-model",
                                 tiny_models["clip_model"], "--clip-pretrained", tiny_models["clip_pretrained"],
                                 "--head", f"pcartoon=linear:{other}", "--rule", "pcartoon < 0.05", "--precision", "fp32"))
    from shardsmith.errors import RunError

    with pytest.raises(RunError, match="heads"):
        run_curate(cfg, log=lambda *a: None)


@pytest.mark.parametrize("head, message", [
    ({"arch": "convnet", "weights": "x.pth"}, "head 'pcartoon': unknown arch 'convnet'"),
    ({"arch": "linear", "weights": "/nonexistent/cartoon.pth"}, "/nonexistent/cartoon.pth: file not found"),
    ({"arch": "linear"}, "heads.pcartoon: weights is required"),
    ({"arch": "linear", "weights": "x.pth", "color": "red"}, "heads.pcartoon: unknown key 'color'"),
])
def test_bad_declared_heads_are_config_errors_naming_the_head(tiny_models, sample, tmp_path, head, message):
    from conftest import curate_config

    cfg = curate_config(sample["images"], tmp_path / "o", tiny_models, preset=None, heads={"pcartoon": head})
    with pytest.raises(ConfigError, match=message):
        run_curate(cfg, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "o" / "manifest.json")  # refused before any work


def test_weights_of_the_wrong_width_are_refused_before_any_work(tiny_models, sample, tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(torch.nn.Linear(768, 1).state_dict(), path)
    cfg = config_from_args(_args(sample["images"], str(tmp_path / "o"), "--preset", "none", "--clip-model",
                                 tiny_models["clip_model"], "--clip-pretrained", tiny_models["clip_pretrained"],
                                 "--head", f"pcartoon=linear:{path}"))
    with pytest.raises(ConfigError, match=r"head 'pcartoon' \(linear\).*wide.pth.*expects 768-d embeddings but "
                                          r"the CLIP model gives 64-d"):
        run_curate(cfg, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_head_names_and_archs_are_checked():
    from shardsmith.filters.scores import declared_score

    with pytest.raises(ConfigError, match="a column or field name"):
        declared_score("min_side", "linear")
    with pytest.raises(ConfigError, match="lower case"):
        declared_score("Cartoon", "linear")
    with pytest.raises(ConfigError, match="outside the range of punsafe"):
        declared_score("punsafe", "linear")  # a raw output cannot be a probability column
    assert declared_score("aesthetic", "linear").range == declared_score("aesthetic", "laion-aesthetic").range


def test_arch_tables_agree():
    from shardsmith.filters.heads import ARCH_CLASSES
    from shardsmith.filters.scores import HEAD_ARCHS

    assert set(ARCH_CLASSES) == set(HEAD_ARCHS)
