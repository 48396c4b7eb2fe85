"""Read a TensorFlow checkpoint (a TensorBundle) without TensorFlow.

A Keras SavedModel keeps its weights in ``variables/variables.index`` and
``variables/variables.data-00000-of-00001``. The index is a LevelDB-format table (an SSTable: data
blocks of prefix-compressed key/value entries with restart points, an index block pointing at them,
a 48-byte footer ending in the magic number ``0xdb4775248b80fb57``); its keys are the tensor names,
its values ``BundleEntryProto`` messages (dtype, shape, shard, offset, size, masked crc32c); the
empty key holds the ``BundleHeaderProto``. The data file holds the tensors' bytes, little-endian,
at those offsets; a string tensor is its elements' lengths as varints, a masked crc32c of the
lengths (taken over them as 4-byte integers), then the bytes. Every block and tensor checksum is verified.

Only what a checkpoint of dense tensors needs is implemented: no compression (TensorFlow writes
bundle indexes uncompressed), no partitioned (sliced) variables.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from shardsmith.errors import ConfigError


class BundleError(ConfigError):
    """Not a readable TensorBundle; the message says which file and why."""


MAGIC = 0xDB4775248B80FB57
FOOTER = 48
_MASK_DELTA = 0xA282EAD8

# tensorflow/core/framework/types.proto DataType -> numpy (the little-endian dtypes a bundle stores)
DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 14: "<u2", 17: "<u2",
          19: "<f2", 22: "<u4", 23: "<u8"}
DT_STRING = 7


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as TensorFlow and LevelDB compute it."""
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("truncated varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7
        if shift > 63:
            raise BundleError("varint longer than 10 bytes")


def proto_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """A protobuf message's (field number, wire type, value): ints for varints and fixed, bytes
    for length-delimited fields."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = varint(buf, pos)
            value, pos = bytes(buf[pos:pos + n]), pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        out.append((field, wire, value))
    if pos != len(buf):
        raise BundleError("truncated protobuf message")
    return out


def _block(data: bytes, offset: int, size: int, what: str) -> bytes:
    if offset + size + 5 > len(data):
        raise BundleError(f"{what}: block at {offset}+{size} runs past the end of the file")
    contents, kind = data[offset:offset + size], data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if mask(crc32c(data[offset:offset + size + 1])) != stored:
        raise BundleError(f"{what}: block at offset {offset} fails its crc32c check (damaged file)")
    if kind != 0:
        raise BundleError(f"{what}: block compressed with type {kind}; only uncompressed tables are supported")
    return contents


def _entries(block: bytes) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise BundleError("block too short")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise BundleError("block restart array runs past its start")
    out, pos, key = [], 0, b""
    while pos < end:
        shared, pos = varint(block, pos)
        unshared, pos = varint(block, pos)
        vlen, pos = varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > end:
            raise BundleError("malformed block entry")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        out.append((key, block[pos:pos + vlen]))
        pos += vlen
    return out


def read_table(data: bytes, what: str = "table") -> dict[bytes, bytes]:
    """Every key -> value of a LevelDB-format table held in ``data``."""
    if len(data) < FOOTER or struct.unpack_from("<Q", data, len(data) - 8)[0] != MAGIC:
        raise BundleError(f"{what}: not a LevelDB-format table (no magic number at its end)")
    footer = data[len(data) - FOOTER:]
    _, pos = varint(footer, 0)  # the metaindex handle (unused)
    _, pos = varint(footer, pos)
    index_off, pos = varint(footer, pos)
    index_size, pos = varint(footer, pos)
    out = {}
    for _, handle in _entries(_block(data, index_off, index_size, what)):
        off, p = varint(handle, 0)
        size, _ = varint(handle, p)
        out.update(_entries(_block(data, off, size, what)))
    return out


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for field, _, value in proto_fields(buf):
        if field == 2:
            size = next((v for f, _, v in proto_fields(value) if f == 1), 0)
            dims.append(size - (1 << 64) if size >= 1 << 63 else size)
        elif field == 3 and value:
            raise BundleError("a tensor of unknown rank")
    return tuple(dims)


class TensorBundle:
    """The tensors of a checkpoint: ``bundle[name]`` is a numpy array (a list of bytes for a
    string tensor). ``prefix`` is the path without ``.index`` (e.g. ``.../variables/variables``)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        index = prefix + ".index"
        try:
            with open(index, "rb") as f:
                table = read_table(f.read(), index)
        except OSError as e:
            raise BundleError(f"{index}: cannot read: {e}") from e
        header = table.pop(b"", None)
        if header is None:
            raise BundleError(f"{index}: no bundle header (empty key): not a TensorFlow checkpoint index")
        fields = {f: v for f, _, v in proto_fields(header)}
        self.num_shards = fields.get(1, 1) or 1
        if fields.get(2, 0) != 0:
            raise BundleError(f"{index}: a big-endian bundle; only little-endian is supported")
        self.entries = {}
        for key, value in table.items():
            e = {1: 0, 3: 0, 4: 0, 5: 0, 6: None}
            slices = False
            shape = ()
            for f, _, v in proto_fields(value):
                if f == 2:
                    shape = _shape(v)
                elif f == 7:
                    slices = True
                else:
                    e[f] = v
            self.entries[key.decode("utf-8", errors="replace")] = {
                "dtype": e[1], "shape": shape, "shard": e[3], "offset": e[4], "size": e[5], "crc32c": e[6],
                "sliced": slices}
        self._shards: dict[int, bytes] = {}

    def names(self) -> list[str]:
        return sorted(self.entries)

    def _data(self, shard: int) -> bytes:
        if shard not in self._shards:
            path = f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"
            if not os.path.exists(path):
                raise BundleError(f"{path}: missing (the checkpoint's data file)")
            with open(path, "rb") as f:
                self._shards[shard] = f.read()
        return self._shards[shard]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str):
        e = self.entries.get(name)
        if e is None:
            raise BundleError(f"{self.prefix}: no tensor {name!r}")
        if e["sliced"]:
            raise BundleError(f"{self.prefix}: {name} is a partitioned variable (not supported)")
        data = self._data(e["shard"])
        raw = data[e["offset"]:e["offset"] + e["size"]]
        if len(raw) != e["size"]:
            raise BundleError(f"{self.prefix}: {name} runs past the end of its data file")
        if e["dtype"] == DT_STRING:
            return self._strings(name, raw, e)
        if e["crc32c"] is not None and mask(crc32c(raw)) != e["crc32c"]:
            raise BundleError(f"{self.prefix}: {name} fails its crc32c check (damaged data file)")
        if e["dtype"] not in DTYPES:
            raise BundleError(f"{self.prefix}: {name} has an unsupported dtype (DataType {e['dtype']})")
        arr = np.frombuffer(raw, dtype=DTYPES[e["dtype"]])
        if arr.size != int(np.prod(e["shape"], dtype=np.int64)):
            raise BundleError(f"{self.prefix}: {name}: {arr.size} values for shape {list(e['shape'])}")
        return arr.reshape(e["shape"]).copy()

    def _strings(self, name: str, raw: bytes, e: dict) -> list[bytes]:
        n = int(np.prod(e["shape"], dtype=np.int64))
        pos, lengths = 0, []
        for _ in range(n):
            ln, pos = varint(raw, pos)
            lengths.append(ln)
        # TensorFlow checksums the lengths as 4-byte little-endian integers (the file has varints)
        crc = crc32c(b"".join(struct.pack("<I", ln & 0xFFFFFFFF) for ln in lengths))
        (stored_len_crc,) = struct.unpack_from("<I", raw, pos)
        if mask(crc) != stored_len_crc:
            raise BundleError(f"{self.prefix}: {name}: string lengths fail their crc32c check")
        crc = crc32c(raw[pos:pos + 4], crc)
        pos += 4
        out = []
        for ln in lengths:
            out.append(bytes(raw[pos:pos + ln]))
            pos += ln
        crc = crc32c(raw[pos - sum(lengths):pos], crc)
        if e["crc32c"] is not None and mask(crc) != e["crc32c"]:
            raise BundleError(f"{self.prefix}: {name} fails its crc32c check (damaged data file)")
        return out
