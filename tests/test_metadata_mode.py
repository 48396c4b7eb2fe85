"""Metadata-only mode: the rules on the score columns a LAION parquet already has."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_scores

from shardsmith.pipelines.config import CurateConfig
from shardsmith.pipelines.flows.curate import run_curate
from shardsmith.pipelines.formats.inputs import InputError


def laion_table(n, upper=True, seed=0):
    rng = np.random.default_rng(seed)
    cols = {
        "URL": [f"https://x/{i}.jpg" for i in range(n)],
        "TEXT": [f"caption {i}" for i in range(n)],
        "WIDTH": rng.integers(100, 1500, n), "HEIGHT": rng.integers(100, 1500, n),
        "similarity": rng.uniform(0.2, 0.4, n), "punsafe": rng.uniform(0, 1, n).astype(np.float32),
        "pwatermark": rng.uniform(0, 1, n).astype(np.float32),
        "AESTHETIC_SCORE": rng.normal(5, 1, n).astype(np.float32),
    }
    if not upper:
        cols = {k.lower(): v for k, v in cols.items()}
    return pa.table(cols)


def expected_mask(t):
    cols = {k.lower(): t.column(k).to_numpy() for k in t.column_names if k.lower() != "url" and k.lower() != "text"}
    return (cols["aesthetic_score"] >= 5) & (cols["pwatermark"] < 0.8) & (cols["punsafe"] < 0.5)


@pytest.mark.parametrize("upper", [True, False])
def test_laion_aesthetics_5plus_selection(ray_local, tmp_path, upper):
    src = tmp_path / "in"
    src.mkdir()
    tables = [laion_table(3000, upper, seed=s) for s in range(2)]
    for i, t in enumerate(tables):
        pq.write_table(t, src / f"part-{i:05d}.parquet", row_group_size=700)
    out = tmp_path / "out"
    stats = run_curate(CurateConfig(input=str(src), output=str(out), progress=False), log=lambda *a: None)
    assert stats["mode"] == "metadata"
    for i, t in enumerate(tables):
        selected = pq.read_table(out / "curated" / f"part-{i:05d}.parquet")
        assert selected.equals(t.filter(pa.array(expected_mask(t))))  # original columns untouched
        scores = pq.read_table(out / "scores" / f"part-{i:05d}.parquet")
        assert scores.num_rows == t.num_rows
    assert stats["kept"] == sum(int(expected_mask(t).sum()) for t in tables)
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"] == 6000


def test_nan_and_out_of_range_scores_are_error_rows(ray_local, tmp_path):
    t = laion_table(10)
    punsafe = t.column("punsafe").to_numpy().copy()
    punsafe[2], punsafe[5] = np.nan, 1.5
    t = t.set_column(t.column_names.index("punsafe"), "punsafe", pa.array(punsafe))
    pq.write_table(t, tmp_path / "m.parquet")
    stats = run_curate(CurateConfig(input=str(tmp_path / "m.parquet"), output=str(tmp_path / "o"), progress=False),
                       log=lambda *a: None)
    rows = read_scores(tmp_path / "o").to_pylist()
    assert stats["errors_by_kind"] == {"missing_value": 1, "bad_value": 1}
    assert rows[2]["status"] == "error" and "punsafe is missing" in rows[2]["error"]
    assert rows[5]["status"] == "error" and "punsafe=1.5" in rows[5]["error"]


def test_missing_column_is_named_before_any_work(tmp_path):
    t = laion_table(5).drop_columns(["pwatermark"])
    pq.write_table(t, tmp_path / "m.parquet")
    with pytest.raises(InputError, match=r"m\.parquet: missing column 'PWATERMARK'"):
        run_curate(CurateConfig(input=str(tmp_path / "m.parquet"), output=str(tmp_path / "o")), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "o")


def test_wrong_column_type_is_named(tmp_path):
    t = laion_table(5)
    t = t.set_column(t.column_names.index("punsafe"), "punsafe", pa.array(["x"] * 5))
    pq.write_table(t, tmp_path / "m.parquet")
    with pytest.raises(InputError, match="'punsafe' has type string"):
        run_curate(CurateConfig(input=str(tmp_path / "m.parquet"), output=str(tmp_path / "o")), log=lambda *a: None)
