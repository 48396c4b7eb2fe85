"""What training and indexing code reads from our outputs, with the real clients: webdataset's
``WebDataset`` under a multi-worker torch ``DataLoader``, Hugging Face ``datasets``' webdataset
loader, and a faiss index over the embeddings in clip-retrieval/autofaiss layout. The runs are
made through the Python API (``import shardsmith``), as a notebook would.

Deduplicated shards (``shardsmith dedup``) are not covered yet: that job is being built elsewhere;
when it lands, add its output to ``SHARDS`` below -- the checks are the same.
"""

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_scores

import shardsmith
from shardsmith.pipelines.formats.embeddings import embedding_shards, iter_embeddings

QUIET = dict(log=lambda *a: None, progress=False)
IMAGE_EXTS = {"jpg", "png", "webp"}


@pytest.fixture(scope="module")
def outputs(ray_local, tiny_models, sample, tmp_path_factory):
    d = tmp_path_factory.mktemp("eco")
    m = tiny_models
    cur = shardsmith.curate(sample["images"], str(d / "curated"), clip_model=m["clip_model"],
                            clip_pretrained=m["clip_pretrained"], aesthetic_head=m["aesthetic_head"],
                            watermark_head=m["watermark_head"], nsfw_head=m["nsfw_head"], batch_size=16,
                            preset="laion-aesthetics-5plus", embeddings=True, report=False, **QUIET)
    gen = shardsmith.generate(None, str(d / "generated"), model=m["sd_model"],
                              from_captions=str(d / "curated" / "curated"), limit=4, shard_size=2, batch_size=2,
                              defaults={"num_inference_steps": 2, "width": 64, "height": 64, "seed": 1}, **QUIET)
    aug = shardsmith.augment(str(d / "generated"), str(d / "augmented"), model=m["sd_model"], variants=2,
                             strength=0.5, size=[64, 64], batch_size=4, defaults={"num_inference_steps": 2}, **QUIET)
    assert cur["kept"] > 10 and gen["kept"] == 4 and aug["kept"] == 8
    return {"dir": d, "curate": cur}


def _kept(outputs, which):
    """(tar paths, {key: caption}) of what a run kept."""
    d = outputs["dir"]
    if which == "curated":
        tars = sorted(glob.glob(str(d / "curated" / "curated" / "*.tar")))
        scores = read_scores(d / "curated")
        kept = scores.filter(pa.compute.equal(scores.column("status"), "kept"))
        return tars, dict(zip(kept.column("key").to_pylist(), kept.column("caption").to_pylist()))
    tars = sorted(glob.glob(str(d / which / "*.tar")))
    index = pa.concat_tables([pq.read_table(t[:-4] + ".parquet") for t in tars])
    ok = index.filter(pa.compute.equal(index.column("status"), "success"))
    captions = ok.column("caption").to_pylist() if "caption" in ok.column_names else [None] * ok.num_rows
    return tars, dict(zip(ok.column("key").to_pylist(), captions))


SHARDS = ["curated", "generated", "augmented"]  # + "deduplicated" when dedup lands


@pytest.mark.parametrize("which", SHARDS)
def test_webdataset_with_a_multi_worker_dataloader(outputs, which):
    import torch
    import webdataset as wds
    from PIL import Image

    tars, kept = _kept(outputs, which)
    ds = wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    seen = {}
    for sample in loader:
        fields = {k for k in sample if not k.startswith("__")}
        images = fields & IMAGE_EXTS
        assert len(images) == 1 and fields == images | {"txt", "json"}, fields  # image, caption, json, nothing else
        img = sample[images.pop()]
        assert isinstance(img, Image.Image) and img.size[0] > 0
        meta = sample["json"]
        assert isinstance(meta, dict) and meta.get("key", sample["__key__"]) == sample["__key__"]
        seen[sample["__key__"]] = sample["txt"]
    assert set(seen) == set(kept) and len(seen) == len(kept)
    if which == "curated":
        assert seen == kept  # the caption a trainer reads is the one the scores were computed with


def _image_exts(tars) -> set[str]:
    import tarfile

    exts = set()
    for t in tars:
        with tarfile.open(t) as tar:
            exts |= {m.name.rsplit(".", 1)[-1] for m in tar.getmembers()} & IMAGE_EXTS
    return exts


def hf_features(exts):
    """What ``load_dataset("webdataset")`` cannot infer from shards whose samples differ in image
    type (it looks at the first 5 samples and wants one set of extensions): the README's recipe."""
    import datasets

    return datasets.Features({**{e: datasets.Image() for e in sorted(exts)}, "txt": datasets.Value("string"),
                              "json": datasets.Json(), "__key__": datasets.Value("string"),
                              "__url__": datasets.Value("string")})


@pytest.mark.parametrize("which", SHARDS)
def test_huggingface_datasets_webdataset_loader(outputs, which, tmp_path):
    import datasets

    tars, kept = _kept(outputs, which)
    exts = _image_exts(tars)

    def load(**kw):
        return datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                                     cache_dir=str(tmp_path / "hf-cache"), **kw)

    if len(exts) == 1:  # one image type (img2dataset's usual): the loader infers everything
        ds = load()
    else:  # this sample mixes jpg, png and webp, copied as they came: the loader needs the features
        with pytest.raises(ValueError, match="don't share the same prefix or the same types"):
            load()
        ds = load(features=hf_features(exts))
    assert ds.num_rows == len(kept) and sorted(ds["__key__"]) == sorted(kept)
    columns = set(ds.column_names) - {"__key__", "__url__"}
    assert columns == exts | {"txt", "json"}
    for row in ds:
        present = {c for c in columns if row[c] is not None}
        images = present & IMAGE_EXTS
        assert len(images) == 1 and present == images | {"txt", "json"}, present
        assert row[images.pop()].size[0] > 0 and isinstance(row["json"], dict)
        if which == "curated":
            assert row["txt"] == kept[row["__key__"]]


def test_faiss_index_over_the_embeddings_maps_ids_back_to_keys(outputs):
    """autofaiss reads ``img_emb/*.npy`` in file-name order and clip-retrieval joins
    ``metadata/*.parquet`` in the same order, row for row: build that index, query it, map ids to keys."""
    import faiss

    out = str(outputs["dir"] / "curated")
    emb_files = sorted(glob.glob(os.path.join(out, "img_emb", "*.npy")))
    meta_files = sorted(glob.glob(os.path.join(out, "metadata", "*.parquet")))
    assert [os.path.basename(f)[len("img_emb_"):-4] for f in emb_files] == \
        [os.path.basename(f)[len("metadata_"):-8] for f in meta_files] == embedding_shards(out)
    emb = np.concatenate([np.load(f) for f in emb_files])  # what autofaiss does
    meta = pa.concat_tables([pq.read_table(f) for f in meta_files])
    assert emb.dtype == np.float16 and emb.shape == (meta.num_rows, 64)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-3)
    # the shared reader gives the same rows, shard by shard
    ours = list(iter_embeddings(out))
    assert np.array_equal(np.concatenate([e for _, _, e in ours]), emb)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb.astype(np.float32))
    keys = meta.column("key").to_pylist()
    queries = [0, len(keys) // 2, len(keys) - 1]
    scores, ids = index.search(emb[queries].astype(np.float32), 3)
    assert [keys[i] for i in ids[:, 0]] == [keys[q] for q in queries] and np.all(scores[:, 0] > 0.99)
    # every indexed key is a row of the run that has an embedding (not an error), once
    table = read_scores(out)
    scored = [k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist()) if s != "error"]
    assert sorted(keys) == sorted(scored)
    statuses = dict(zip(table.column("key").to_pylist(), table.column("status").to_pylist()))
    assert meta.column("status").to_pylist() == [statuses[k] for k in keys]
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["models"]["embed_dim"] == emb.shape[1]
