"""Hostile safetensors files and checkpoint folders: every one is refused with a
:class:`convlens.ConversionError` naming the problem (never another exception), and a conversion
from such a source writes nothing.

Files are built byte by byte: an 8-byte little-endian header length, the JSON header, the data.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from timelimit import deadline

import convlens
from convlens.checkpoint import convert_checkpoint
from convlens.cli import main
from convlens.runtime.safetensors_io import INDEX_NAME, MAX_HEADER, open_checkpoint, read_header

Tensors = dict[str, tuple[str, list[int]]]
SIZES = {"F32": 4, "BF16": 2, "U8": 1, "F8_E4M3": 1}


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None
             ) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def write(path: Path, header: dict[str, Any] | bytes, data: bytes = b"",
          length: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(st_bytes(header, data, length))
    return path


def valid(path: Path, tensors: Tensors) -> Path:
    """A well-formed file: tensors laid out back to back, each byte its index mod 251."""
    header: dict[str, Any] = {}
    offset = 0
    for key, (dtype, shape) in tensors.items():
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return write(path, header, bytes(i % 251 for i in range(offset)))


def index(root: Path, weight_map: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / INDEX_NAME
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


ONE: Tensors = {"k": ("F32", [2, 2])}


# --- the hostile table --------------------------------------------------------------------------
# Each case builds a checkpoint folder under tmp_path/"ckpt" and returns the exact message of the
# error (``ConversionError.message``), or a prefix of it when it quotes Python's JSON parser.

Case = Callable[[Path], tuple[str, bool]]


def traversal(t: Path) -> tuple[str, bool]:
    valid(t / "x.safetensors", ONE)  # exists: only the check keeps it from being read
    valid(t / "ckpt" / "a.safetensors", {"a": ("U8", [2])})
    index(t / "ckpt", {"a": "a.safetensors", "k": "../x.safetensors"})
    return (f"{t / 'ckpt' / INDEX_NAME}: shard name '../x.safetensors' leaves the checkpoint "
            "folder", True)


def nested_traversal(t: Path) -> tuple[str, bool]:
    valid(t / "x.safetensors", ONE)
    (t / "ckpt" / "sub").mkdir(parents=True)
    index(t / "ckpt", {"k": "sub/../../x.safetensors"})
    return (f"{t / 'ckpt' / INDEX_NAME}: shard name 'sub/../../x.safetensors' leaves the "
            "checkpoint folder", True)


def absolute(t: Path) -> tuple[str, bool]:
    outside = valid(t / "x.safetensors", ONE)
    index(t / "ckpt", {"k": str(outside)})
    return (f"{t / 'ckpt' / INDEX_NAME}: shard name '{outside}' leaves the checkpoint folder",
            True)


def symlink_outside(t: Path) -> tuple[str, bool]:
    outside = valid(t / "x.safetensors", ONE)
    (t / "ckpt").mkdir()
    os.symlink("../x.safetensors", t / "ckpt" / "link.safetensors")
    index(t / "ckpt", {"k": "link.safetensors"})
    return (f"{t / 'ckpt' / INDEX_NAME}: shard 'link.safetensors' resolves outside the "
            f"checkpoint folder ({outside.resolve()})", True)


def symlink_outside_without_index(t: Path) -> tuple[str, bool]:
    outside = valid(t / "x.safetensors", ONE)
    (t / "ckpt").mkdir()
    os.symlink("../x.safetensors", t / "ckpt" / "model.safetensors")
    return (f"{t / 'ckpt' / 'model.safetensors'}: a link to {outside.resolve()}, outside the "
            "checkpoint folder", True)


def symlinked_folder_outside(t: Path) -> tuple[str, bool]:
    outside = valid(t / "elsewhere" / "x.safetensors", ONE)
    (t / "ckpt").mkdir()
    os.symlink("../elsewhere", t / "ckpt" / "sub")
    index(t / "ckpt", {"k": "sub/x.safetensors"})
    return (f"{t / 'ckpt' / INDEX_NAME}: shard 'sub/x.safetensors' resolves outside the "
            f"checkpoint folder ({outside.resolve()})", True)


def overlapping(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
               "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}, bytes(12))
    return f"{p}: tensors 'a' and 'b' overlap", True


def same_range_twice(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, bytes(8))
    return f"{p}: tensors 'a' and 'b' overlap", True


def wrong_size(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, bytes(16))
    return f"{p}: F32[2, 2] needs 16 bytes but data_offsets [0, 8] hold 8", True


def unknown_dtype(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "F17", "shape": [2], "data_offsets": [0, 4]}}, bytes(4))
    return f"{p}: unknown dtype 'F17'", True


def bad_shape(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "U8", "shape": [2, -1], "data_offsets": [0, 0]}})
    return f"{p}: bad shape [2, -1]", True


def bool_shape(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, bytes(1))
    return f"{p}: bad shape [True]", True


def bad_offsets(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "U8", "shape": [2], "data_offsets": [0]}}, bytes(2))
    return f"{p}: bad data_offsets [0]", True


def decreasing_offsets(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}}, bytes(4))
    return f"{p}: data_offsets [4, 2] are not an increasing range", True


def truncated_data(t: Path) -> tuple[str, bool]:
    header = json.dumps({"k": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    p = write(t / "ckpt" / "model.safetensors", header.encode(), bytes(10))  # 6 bytes cut
    base = 8 + len(header)
    return f"{p}: truncated: tensor ends at byte {base + 16}, the file has {base + 10}", True


def empty_file(t: Path) -> tuple[str, bool]:
    p = t / "ckpt" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(b"")
    return f"{p}: truncated: 0 bytes, not even a header length", True


def short_length(t: Path) -> tuple[str, bool]:
    p = t / "ckpt" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(b"\x10\x00\x00")
    return f"{p}: truncated: 3 bytes, not even a header length", True


def header_past_the_end(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", b'{"a": 1}  ', length=1000)
    return f"{p}: truncated: header of 1000 bytes but the file has 18", True


def huge_header(t: Path) -> tuple[str, bool]:
    n = 200 * 1024 * 1024
    p = write(t / "ckpt" / "model.safetensors", b"{}", length=n)
    return f"{p}: header claims {n} bytes (limit {MAX_HEADER})", True


def max_length(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", b"{}", length=2**64 - 1)
    return f"{p}: header claims {2**64 - 1} bytes (limit {MAX_HEADER})", True


def not_json(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", b"{'k': nope}")
    return f"{p}: header is not valid JSON (Expecting property name enclosed in double quotes", \
        False


def not_utf8(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", b'{"\xff": 1}')
    return f"{p}: header is not valid JSON ('utf-8' codec can't decode byte 0xff", False


def not_an_object(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", b"[1, 2]")
    return f"{p}: header is not a JSON object", True


def metadata_not_strings(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", {"__metadata__": {"format": 1}})
    return f"{p}: __metadata__ must map strings to strings", True


def entry_not_object(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", {"k": [0, 4]})
    return f"{p}: tensor entry is not an object", True


def deep_header(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors", b"[" * 100_000 + b"]" * 100_000)
    return f"{p}: header is not valid JSON", False


def huge_integer(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              b'{"k": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}',
              bytes(1))
    return f"{p}: header is not valid JSON", False


def key_in_two_shards(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2]), "x": ("U8", [1])})
    valid(t / "ckpt" / "b.safetensors", {"k": ("U8", [2])})
    return "'k' is in two shards: a.safetensors and b.safetensors", True


def key_in_two_indexed_shards(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    valid(t / "ckpt" / "b.safetensors", {"k": ("U8", [2]), "y": ("U8", [1])})
    index(t / "ckpt", {"k": "a.safetensors", "y": "b.safetensors"})
    return "'k' is in two shards: a.safetensors and b.safetensors", True


def index_missing_shard(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    index(t / "ckpt", {"k": "a.safetensors", "y": "b.safetensors"})
    return f"{t / 'ckpt' / INDEX_NAME}: shard(s) missing: b.safetensors", True


def index_disagrees(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    valid(t / "ckpt" / "b.safetensors", {"y": ("U8", [2])})
    index(t / "ckpt", {"k": "b.safetensors", "y": "a.safetensors"})  # swapped
    return (f"{t / 'ckpt' / INDEX_NAME}: 'k' is listed in b.safetensors but lives in "
            "a.safetensors", True)


def index_names_absent_key(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    index(t / "ckpt", {"k": "a.safetensors", "zz": "a.safetensors"})
    return f"{t / 'ckpt' / INDEX_NAME}: 'zz' is listed in a.safetensors but no shard holds it", \
        True


def index_misses_key(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2]), "k2": ("U8", [1])})
    index(t / "ckpt", {"k": "a.safetensors"})
    return (f"{t / 'ckpt' / INDEX_NAME}: 1 key(s) in the shards are not in the index, e.g. "
            "'k2'", True)


def index_not_json(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    (t / "ckpt" / INDEX_NAME).write_text('{"weight_map": ')
    return f"{t / 'ckpt' / INDEX_NAME}: not a readable JSON index (Expecting value", False


def index_without_weight_map(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    (t / "ckpt" / INDEX_NAME).write_text('{"metadata": {}}')
    return f"{t / 'ckpt' / INDEX_NAME}: no weight_map", True


def deep_index(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    (t / "ckpt" / INDEX_NAME).write_text("[" * 100_000 + "]" * 100_000)
    return f"{t / 'ckpt' / INDEX_NAME}: not a readable JSON index", False


def terabyte_tensor(t: Path) -> tuple[str, bool]:
    """A header claiming a 1 TB tensor in a file of a few bytes: refused from the header alone,
    nothing of that size is allocated (test_a_terabyte_claim_allocates_nothing)."""
    header = json.dumps({"k": {"dtype": "F32", "shape": [1 << 18, 1 << 20],
                               "data_offsets": [0, 1 << 40]}})
    p = write(t / "ckpt" / "model.safetensors", header.encode(), bytes(16))
    base = 8 + len(header)
    return (f"{p}: truncated: tensor ends at byte {base + (1 << 40)}, the file has {base + 16}",
            True)


def astronomical_shape(t: Path) -> tuple[str, bool]:
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, bytes(4))
    return f"{p}: F32[{2**62}, {2**62}] needs {2**126} bytes but data_offsets [0, 4] hold 4", True


def dtype_of_another_size(t: Path) -> tuple[str, bool]:
    """The bytes of an F32[2, 2] declared as BF16[2, 2] (a wrong dtype size)."""
    p = write(t / "ckpt" / "model.safetensors",
              {"k": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16))
    return f"{p}: BF16[2, 2] needs 8 bytes but data_offsets [0, 16] hold 16", True


def duplicated_shard(t: Path) -> tuple[str, bool]:
    """The same shard twice (a link inside the folder), no index."""
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    os.symlink("a.safetensors", t / "ckpt" / "b.safetensors")
    return "'k' is in two shards: a.safetensors and b.safetensors", True


def zero_byte_shard_in_index(t: Path) -> tuple[str, bool]:
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    (t / "ckpt" / "b.safetensors").write_bytes(b"")
    index(t / "ckpt", {"k": "a.safetensors", "y": "b.safetensors"})
    return f"{t / 'ckpt' / 'b.safetensors'}: truncated: 0 bytes, not even a header length", True


def shard_is_a_folder(t: Path) -> tuple[str, bool]:
    (t / "ckpt" / "a.safetensors").mkdir(parents=True)
    index(t / "ckpt", {"k": "a.safetensors"})
    return f"{t / 'ckpt' / 'a.safetensors'}: not a regular file", True


def symlink_loop_without_index(t: Path) -> tuple[str, bool]:
    (t / "ckpt").mkdir()
    os.symlink("model.safetensors", t / "ckpt" / "model.safetensors")
    return (f"{t / 'ckpt' / 'model.safetensors'}: cannot read: Too many levels of symbolic "
            "links", True)


# Found by fuzzing: names the OS refuses, symlink loops, FIFOs, one shard under two names.


def nul_in_shard_name(t: Path) -> tuple[str, bool]:
    """ValueError('embedded null byte') escapes from Path.resolve()/exists() in _inside."""
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    index(t / "ckpt", {"k": "a\x00.safetensors"})
    return f"{t / 'ckpt' / INDEX_NAME}: shard name 'a\\x00.safetensors'", False


def shard_name_too_long(t: Path) -> tuple[str, bool]:
    """OSError(ENAMETOOLONG) escapes from Path.exists() in open_checkpoint."""
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2])})
    index(t / "ckpt", {"k": "x" * 300 + ".safetensors"})
    return f"{t / 'ckpt' / INDEX_NAME}: shard name 'xxxxxxxx", False


def symlink_loop_in_index(t: Path) -> tuple[str, bool]:
    """RuntimeError('Symlink loop from ...') escapes from Path.resolve() in _inside."""
    (t / "ckpt").mkdir()
    os.symlink("a.safetensors", t / "ckpt" / "a.safetensors")
    index(t / "ckpt", {"k": "a.safetensors"})
    return f"{t / 'ckpt' / INDEX_NAME}: shard 'a.safetensors'", False


def fifo_shard(t: Path) -> tuple[str, bool]:
    """A named pipe: read_header's open() blocks forever waiting for a writer."""
    (t / "ckpt").mkdir()
    os.mkfifo(t / "ckpt" / "model.safetensors")
    return f"{t / 'ckpt' / 'model.safetensors'}: not a regular file", False


def fifo_shard_in_index(t: Path) -> tuple[str, bool]:
    (t / "ckpt").mkdir()
    os.mkfifo(t / "ckpt" / "a.safetensors")
    index(t / "ckpt", {"k": "a.safetensors"})
    return f"{t / 'ckpt' / 'a.safetensors'}: not a regular file", False


def same_shard_under_two_names(t: Path) -> tuple[str, bool]:
    """The index names one file twice ('a.safetensors', './a.safetensors'): refused, but as
    "'k' is in two shards: a.safetensors and a.safetensors", which names one file twice."""
    valid(t / "ckpt" / "a.safetensors", {"k": ("U8", [2]), "j": ("U8", [1])})
    index(t / "ckpt", {"k": "a.safetensors", "j": "./a.safetensors"})
    return f"{t / 'ckpt' / INDEX_NAME}: shard a.safetensors is listed under two names", False


def no_shards(t: Path) -> tuple[str, bool]:
    (t / "ckpt").mkdir()
    (t / "ckpt" / "config.json").write_text("{}")
    return f"{t / 'ckpt'}: no *.safetensors files", True


def no_folder(t: Path) -> tuple[str, bool]:
    return f"{t / 'ckpt'}: no such checkpoint folder", True


HOSTILE = [
    traversal, nested_traversal, absolute, symlink_outside, symlink_outside_without_index,
    symlinked_folder_outside,
    overlapping, same_range_twice, wrong_size, unknown_dtype, bad_shape, bool_shape,
    bad_offsets, decreasing_offsets, truncated_data, empty_file, short_length,
    header_past_the_end, huge_header, max_length, not_json, not_utf8, not_an_object,
    metadata_not_strings, entry_not_object,
    deep_header, huge_integer,
    key_in_two_shards, key_in_two_indexed_shards, index_missing_shard, index_disagrees,
    index_names_absent_key, index_misses_key, index_not_json, index_without_weight_map,
    deep_index,
    no_shards, no_folder,
    terabyte_tensor, astronomical_shape, dtype_of_another_size, duplicated_shard,
    zero_byte_shard_in_index, shard_is_a_folder, symlink_loop_without_index,
    nul_in_shard_name, shard_name_too_long, symlink_loop_in_index, fifo_shard,
    fifo_shard_in_index, same_shard_under_two_names,
]




@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_is_refused_with_its_message(tmp_path: Path, case: Case) -> None:
    message, exact = case(tmp_path)
    with pytest.raises(convlens.ConversionError) as info, deadline(3):
        open_checkpoint(tmp_path / "ckpt")
    if exact:
        assert info.value.message == message
    else:
        assert info.value.message.startswith(message), info.value.message


HOSTILE_SOURCES = [traversal, symlink_outside, overlapping, wrong_size, truncated_data,
                   empty_file, huge_header, not_json, key_in_two_shards, index_missing_shard,
                   index_disagrees, terabyte_tensor, duplicated_shard]


@pytest.mark.parametrize("case", HOSTILE_SOURCES)
def test_a_hostile_source_writes_nothing(tmp_path: Path, case: Case, capsys: Any) -> None:
    message, _ = case(tmp_path)
    src = tmp_path / "ckpt"
    (src / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"],
                                                 "model_type": "mixtral"}))
    listing = sorted(p.name for p in tmp_path.iterdir())
    for direction in ("apply", "revert"):
        with pytest.raises(convlens.ConversionError) as info:
            convert_checkpoint(src, tmp_path / "dst", direction=direction)  # type: ignore[arg-type]
        assert info.value.message.startswith(message)
        assert main([direction, "--rules", "mixtral", str(src), str(tmp_path / "dst"),
                     "-q"]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary folder


def test_a_terabyte_claim_allocates_nothing(tmp_path: Path) -> None:
    """Refusing a header that claims 1 TB reads the header only: a few kB are allocated."""
    message, _ = terabyte_tensor(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(convlens.ConversionError) as info:
            open_checkpoint(tmp_path / "ckpt")
        with pytest.raises(convlens.ConversionError):
            convert_checkpoint(tmp_path / "ckpt", tmp_path / "dst", rules="mixtral",
                               direction="apply", dry_run=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.message == message
    assert peak < 16 << 20, f"{peak} bytes allocated"


# --- what is accepted ---------------------------------------------------------------------------


def test_a_save_file_header_is_read_exactly(tmp_path: Path) -> None:
    sd = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
          "b": torch.zeros(0, 4, dtype=torch.bfloat16),
          "c": torch.tensor(1.5),
          "d": torch.full((5,), 7, dtype=torch.uint8)}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "x": "y"})
    shard = read_header(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert shard.metadata == {"format": "pt", "x": "y"}
    assert shard.size == len(data)
    assert set(shard.entries) == set(sd)
    for key, t in sd.items():
        e = shard.entries[key]
        begin, end = header[key]["data_offsets"]
        assert (e.dtype, e.shape, e.start, e.end) == (header[key]["dtype"], tuple(t.shape),
                                                      8 + n + begin, 8 + n + end)
        assert data[e.start:e.end] == t.reshape(-1).view(torch.uint8).numpy().tobytes()
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.root == tmp_path and sorted(ckpt.keys()) == sorted(sd)
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in sd.values())
    single = open_checkpoint(path)  # one file instead of a folder
    assert single.root == tmp_path and sorted(single.keys()) == sorted(sd)


def test_empty_tensors_may_share_an_offset(tmp_path: Path) -> None:
    p = write(tmp_path / "model.safetensors",
              {"e1": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
               "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
               "e2": {"dtype": "U8", "shape": [3, 0], "data_offsets": [2, 2]},
               "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, bytes(6))
    shard = read_header(p)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert {k: (e.start - 8 - n, e.end - 8 - n) for k, e in shard.entries.items()} == {
        "e1": (0, 0), "a": (0, 4), "e2": (2, 2), "b": (4, 6)}


def test_an_index_may_name_shards_in_subfolders_and_links_inside(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    valid(root / "sub" / "a.safetensors", {"a": ("U8", [2])})
    valid(root / "real" / "b.safetensors", {"b": ("BF16", [3])})
    os.symlink("real/b.safetensors", root / "b.safetensors")
    index(root, {"a": "sub/a.safetensors", "b": "b.safetensors"})
    ckpt = open_checkpoint(root)
    assert {k: s.path for k, s in ckpt.where.items()} == {
        "a": root / "sub" / "a.safetensors", "b": root / "b.safetensors"}
    assert ckpt.index_metadata == {"total_size": 0}
    assert ckpt.entry("b").dtype == "BF16" and ckpt.entry("b").shape == (3,)


def test_a_hugging_face_cache_snapshot_is_read_through_its_blob_links(tmp_path: Path) -> None:
    """huggingface_hub keeps files in ``blobs/`` and links them from ``snapshots/REV/``: the
    links leave the snapshot folder but stay inside the repository's cache, which is allowed
    (and nowhere else is)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    valid(repo / "blobs" / "0a1b2c", {"k": ("U8", [2])})
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/0a1b2c", snap / "model-00001-of-00001.safetensors")
    index(snap, {"k": "model-00001-of-00001.safetensors"})
    assert list(open_checkpoint(snap).keys()) == ["k"]
    (snap / INDEX_NAME).unlink()
    assert list(open_checkpoint(snap).keys()) == ["k"]
