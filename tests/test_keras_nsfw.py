"""LAION's Keras NSFW detector converted without TensorFlow.

The checkpoint here is written by a minimal TensorBundle writer of this file, following the format
(LevelDB table: prefix-compressed entries, restart points, block trailers with masked crc32c, an
index block, the 48-byte footer; BundleHeaderProto / BundleEntryProto in protobuf wire format; a
data file of little-endian tensors), independent of the reader under test. The converted head's
scores must equal the Keras model's computation written here in numpy ([in, out] kernels)."""

import os
import struct
import zipfile

import numpy as np
import pytest
import torch

from shardsmith.filters.heads import load_head
from shardsmith.filters.keras_nsfw import KerasConversionError, convert_keras_nsfw
from shardsmith.filters.tensorbundle import BundleError, TensorBundle


# ---- an independent writer --------------------------------------------------------------------

def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_varint(field: int, value: int) -> bytes:
    return uvarint(field << 3) + uvarint(value)


def pb_bytes(field: int, value: bytes) -> bytes:
    return uvarint((field << 3) | 2) + uvarint(len(value)) + value


def pb_fixed32(field: int, value: int) -> bytes:
    return uvarint((field << 3) | 5) + struct.pack("<I", value)


def block(entries: list[tuple[bytes, bytes]], restart_every: int) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (k, v) in enumerate(entries):
        shared = 0
        if i % restart_every == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(k), len(prev)) and k[shared] == prev[shared]:
                shared += 1
        out += uvarint(shared) + uvarint(len(k) - shared) + uvarint(len(v)) + k[shared:] + v
        prev = k
    for r in restarts:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts))
    return bytes(out)


def sstable(items: dict[bytes, bytes], per_block: int = 3, restart_every: int = 2) -> bytes:
    keys = sorted(items)
    out = bytearray()
    index = []

    def put(contents: bytes) -> bytes:
        handle = uvarint(len(out)) + uvarint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", masked(crc32c_bitwise(contents + b"\x00"))))
        return handle

    for i in range(0, len(keys), per_block):
        chunk = keys[i:i + per_block]
        index.append((chunk[-1], put(block([(k, items[k]) for k in chunk], restart_every))))
    meta = put(block([], 1))
    idx = put(block(index, 1))
    footer = (meta + idx).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(out) + footer


DT = {np.dtype("float32"): 1, np.dtype("int64"): 9}


def write_bundle(prefix: str, tensors: dict[str, object]) -> None:
    data = bytearray()
    items = {b"": pb_varint(1, 1) + pb_varint(2, 0) + pb_bytes(3, pb_varint(1, 1))}
    for name, value in tensors.items():
        if isinstance(value, list):  # a string tensor
            lens = b"".join(uvarint(len(s)) for s in value)
            crc = crc32c_bitwise(b"".join(struct.pack("<I", len(s)) for s in value))
            len_crc = struct.pack("<I", masked(crc))
            raw = lens + len_crc + b"".join(value)
            crc = crc32c_bitwise(b"".join(value), crc32c_bitwise(len_crc, crc))
            dtype, shape = 7, [len(value)]
        else:
            arr = np.asarray(value)
            raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            crc = crc32c_bitwise(raw)
            dtype, shape = DT[arr.dtype], list(arr.shape)
        shape_pb = b"".join(pb_bytes(2, pb_varint(1, d)) for d in shape)
        entry = pb_varint(1, dtype) + pb_bytes(2, shape_pb) + pb_varint(4, len(data)) + pb_varint(5, len(raw)) \
            + pb_fixed32(6, masked(crc))
        items[name.encode()] = entry
        data += raw
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".index", "wb") as f:
        f.write(sstable(items))
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(bytes(data))


V = "/.ATTRIBUTES/VARIABLE_VALUE"


def keras_nsfw_tensors(rng, dim=24, hidden=(16, 12, 8)):
    """The variables of LAION's AutoKeras model: encoding tables, Normalization, Dense kernels [in, out]."""
    t = {"_CHECKPOINTABLE_OBJECT_GRAPH": [b"\x0a\x03abc" * 7]}
    for c in (3, 17):
        t[f"layer_with_weights-0/encoding_layers/{c}/token_counts/.ATTRIBUTES/table-keys"] = [b"0.125488", b"-0.5"]
        t[f"layer_with_weights-0/encoding_layers/{c}/token_counts/.ATTRIBUTES/table-values"] = \
            np.array([4, 9], np.int64)
    t["layer_with_weights-1/mean" + V] = rng.normal(0, 0.05, dim).astype(np.float32)
    t["layer_with_weights-1/variance" + V] = rng.uniform(5e-4, 2e-3, dim).astype(np.float32)
    t["layer_with_weights-1/count" + V] = np.array(1234, np.int64)
    sizes = [dim, *hidden, 1]
    for j, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        t[f"layer_with_weights-{j + 2}/kernel" + V] = rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
        t[f"layer_with_weights-{j + 2}/bias" + V] = rng.normal(0, 0.1, b).astype(np.float32)
    t["keras_api/metrics/0/count" + V] = np.array(0.0, np.float32)
    return t, len(sizes) - 1


def keras_forward(t, n_dense, x):
    """The Keras model's computation: Normalization, then Dense [in, out] with ReLU, sigmoid."""
    mean, var = t["layer_with_weights-1/mean" + V], t["layer_with_weights-1/variance" + V]
    h = (x - mean) / np.maximum(np.sqrt(var), 1e-7)
    for j in range(n_dense):
        h = h @ t[f"layer_with_weights-{j + 2}/kernel" + V] + t[f"layer_with_weights-{j + 2}/bias" + V]
        h = np.maximum(h, 0) if j < n_dense - 1 else 1 / (1 + np.exp(-h))
    return h[:, 0]


def saved_model_zip(tmp_path, tensors, name="clip_autokeras_binary_nsfw"):
    root = tmp_path / "sm"
    write_bundle(str(root / name / "variables" / "variables"), tensors)
    (root / name / "saved_model.pb").write_bytes(b"\x08\x01")  # not read by the converter
    z = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(z, "w") as f:
        for d, _, files in os.walk(root):
            for fn in files:
                p = os.path.join(d, fn)
                f.write(p, os.path.relpath(p, root))
    return str(z)


# ---- the tests --------------------------------------------------------------------------------

def test_reader_reads_what_the_independent_writer_wrote(tmp_path):
    rng = np.random.default_rng(0)
    tensors, _ = keras_nsfw_tensors(rng)
    write_bundle(str(tmp_path / "v" / "variables"), tensors)
    b = TensorBundle(str(tmp_path / "v" / "variables"))
    assert set(b.names()) == set(tensors)  # several data blocks, prefix-compressed keys, restarts
    for name, value in tensors.items():
        got = b[name]
        if isinstance(value, list):
            assert got == value
        else:
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)


def test_converted_head_equals_the_keras_computation(tmp_path):
    rng = np.random.default_rng(1)
    tensors, n = keras_nsfw_tensors(rng)
    out = tmp_path / "nsfw.safetensors"
    info = convert_keras_nsfw(saved_model_zip(tmp_path, tensors), str(out))
    assert info["layers"] == [16, 12, 8, 1] and info["categorical_columns"] == [3, 17]
    head = load_head("punsafe", str(out), embed_dim=24, arch="laion-nsfw")
    x = rng.normal(0, 0.05, (32, 24)).astype(np.float32)
    with torch.no_grad():
        got = head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, keras_forward(tensors, n, x), rtol=0, atol=1e-6)
    assert got.std() > 1e-3  # the scores vary: a comparison that can fail


def test_b32_shape_converts_too(tmp_path):
    rng = np.random.default_rng(2)
    tensors, n = keras_nsfw_tensors(rng, dim=20, hidden=(6, 6))
    out = tmp_path / "b32.safetensors"
    convert_keras_nsfw(saved_model_zip(tmp_path, tensors, "clip_autokeras_nsfw_b32"), str(out))
    head = load_head("punsafe", str(out), embed_dim=20)
    x = rng.normal(0, 0.05, (8, 20)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(head(torch.from_numpy(x)).numpy(), keras_forward(tensors, n, x), atol=1e-6)


def test_damaged_data_fails_its_checksum(tmp_path):
    rng = np.random.default_rng(3)
    tensors, _ = keras_nsfw_tensors(rng)
    prefix = str(tmp_path / "v" / "variables")
    write_bundle(prefix, tensors)
    data = bytearray(open(prefix + ".data-00000-of-00001", "rb").read())
    data[-3] ^= 0xFF  # inside the last tensor
    open(prefix + ".data-00000-of-00001", "wb").write(bytes(data))
    b = TensorBundle(prefix)
    with pytest.raises(BundleError, match="crc32c"):
        b["keras_api/metrics/0/count" + V]
    index = bytearray(open(prefix + ".index", "rb").read())
    index[5] ^= 0x01
    open(prefix + ".index", "wb").write(bytes(index))
    with pytest.raises(BundleError, match="crc32c"):
        TensorBundle(prefix)


def test_a_model_of_another_shape_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    tensors, _ = keras_nsfw_tensors(rng)
    del tensors["layer_with_weights-1/variance" + V]
    with pytest.raises(KerasConversionError, match="Normalization"):
        convert_keras_nsfw(saved_model_zip(tmp_path, tensors), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()
