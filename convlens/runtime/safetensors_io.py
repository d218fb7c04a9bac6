"""Reading and writing safetensors files without trusting them.

A header is validated before anything is used: its length and JSON size are bounded, every dtype
is known, every tensor's byte range lies inside the file, ranges are in order and do not overlap,
and each size equals shape x dtype. A checkpoint folder's index may not name shards outside the
folder, and a key may live in one shard only.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from convlens.compiler.plan import DTYPE_SIZES
from convlens.errors import ConversionError

MAX_HEADER = 100 * 1024 * 1024  # bytes of JSON; real headers of 300k tensors stay far below
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor of a shard: where its bytes are (absolute offsets in the file)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Shard:
    path: Path
    entries: dict[str, Entry]
    metadata: dict[str, str]
    size: int


def _fail(path: Path, message: str, key: str | None = None) -> ConversionError:
    return ConversionError(f"{path}: {message}", key=key)


def read_header(path: Path) -> Shard:
    """The validated header of one safetensors file."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a device never end
            raise _fail(path, "not a regular file")
        size = info.st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"truncated: {size} bytes, not even a header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _fail(path, f"header claims {n} bytes (limit {MAX_HEADER})")
            if 8 + n > size:
                raise _fail(path, f"truncated: header of {n} bytes but the file has {size}")
            raw = f.read(n)
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror}") from None
    data = _json(path, raw, "header")
    if not isinstance(data, dict):
        raise _fail(path, "header is not a JSON object")
    base = 8 + n
    meta = data.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    entries: dict[str, Entry] = {}
    for key, info in data.items():
        entries[key] = _entry(path, key, info, base, size)
    _check_ranges(path, entries, base, size)
    return Shard(path, entries, dict(meta), size)


def _json(path: Path, raw: bytes, what: str) -> Any:
    """JSON from untrusted bytes; nesting bombs and giant numbers are errors, not crashes."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, f"{what} is not valid JSON (it nests too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise _fail(path, f"{what} is not valid JSON ({exc})") from None


def _entry(path: Path, key: str, info: Any, base: int, size: int) -> Entry:
    # exact type tests (``type(x) is int`` also refuses bools) and one loop per shape: this runs
    # for each of the 100k+ tensors of a large checkpoint
    if type(info) is not dict:
        raise _fail(path, "tensor entry is not an object", key)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    itemsize = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        raise _fail(path, f"unknown dtype {dtype!r}", key)
    if type(shape) is not list or len(shape) > 16:
        raise _fail(path, f"bad shape {shape!r}", key)
    want = itemsize
    for d in shape:
        if type(d) is not int or d < 0:
            raise _fail(path, f"bad shape {shape!r}", key)
        want *= d
    if type(offsets) is not list or len(offsets) != 2:
        raise _fail(path, f"bad data_offsets {offsets!r}", key)
    begin, end = offsets
    if type(begin) is not int or type(end) is not int:
        raise _fail(path, f"bad data_offsets {offsets!r}", key)
    if begin < 0 or end < begin:
        raise _fail(path, f"data_offsets {offsets} are not an increasing range", key)
    if end - begin != want:
        raise _fail(path, f"{dtype}{shape} needs {want} bytes but data_offsets {offsets} hold "
                    f"{end - begin}", key)
    if base + end > size:
        raise _fail(path, f"truncated: tensor ends at byte {base + end}, the file has {size}", key)
    return Entry(key, str(dtype), tuple(shape), base + begin, base + end)


def _check_ranges(path: Path, entries: Mapping[str, Entry], base: int, size: int) -> None:
    last_end, last_key = base, None
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start < last_end and e.nbytes and last_key is not None:
            raise _fail(path, f"tensors {last_key!r} and {e.key!r} overlap", e.key)
        if e.nbytes:
            last_end, last_key = e.end, e.key


@dataclass
class Checkpoint:
    """A checkpoint folder: its shards (validated headers) and which shard holds each key."""

    root: Path
    shards: list[Shard]
    where: dict[str, Shard] = field(default_factory=dict)
    index_metadata: dict[str, Any] = field(default_factory=dict)

    def entry(self, key: str) -> Entry:
        return self.where[key].entries[key]

    def keys(self) -> Iterator[str]:
        return iter(self.where)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for s in self.shards for e in s.entries.values())


def _inside(root: Path, name: str) -> Path:
    """A shard named by an index, refusing names that leave the folder."""
    if not name or os.path.isabs(name) or any(p in ("..", "") for p in Path(name).parts):
        raise ConversionError(f"{root / INDEX_NAME}: shard name {name!r} leaves the checkpoint "
                              "folder")
    path = root / name
    try:
        real = path.resolve()
        path.exists()  # raises on names the OS refuses (too long)
    except ValueError:  # an embedded NUL byte
        raise ConversionError(f"{root / INDEX_NAME}: shard name {name!r} is not a file "
                              "name") from None
    except RuntimeError:  # Python < 3.13 reports a symlink loop so
        raise ConversionError(f"{root / INDEX_NAME}: shard {name!r} is a symlink loop") from None
    except OSError as exc:
        raise ConversionError(f"{root / INDEX_NAME}: shard name {name!r} cannot be used "
                              f"({exc.strerror})") from None
    if not any(r in real.parents for r in _homes(root)):
        raise ConversionError(f"{root / INDEX_NAME}: shard {name!r} resolves outside the "
                              f"checkpoint folder ({real})")
    return path


def _homes(root: Path) -> list[Path]:
    """Where a checkpoint's shards may really live: the folder itself, and for a snapshot of
    the Hugging Face cache (``models--org--name/snapshots/REV``, whose files are symlinks to
    ``../../blobs/SHA``) that repository's blob store."""
    homes = [root.resolve()]
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--") \
            and blobs.is_dir():
        homes.append(blobs.resolve())
    return homes


def _unindexed(root: Path) -> list[Path]:
    """The ``*.safetensors`` files of a folder without an index; links must stay inside it."""
    paths = sorted(root.glob("*.safetensors"))
    homes = _homes(root)
    for path in paths:
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            continue  # a loop or a dangling link: read_header reports it
        if not any(h in real.parents for h in homes):
            raise ConversionError(f"{path}: a link to {real}, outside the checkpoint folder")
    return paths


def open_checkpoint(root: Path) -> Checkpoint:
    """Read and validate every shard header of a checkpoint folder (or one .safetensors file)."""
    if root.is_file():
        shard = read_header(root)
        return Checkpoint(root.parent, [shard], {k: shard for k in shard.entries})
    if not root.is_dir():
        raise ConversionError(f"{root}: no such checkpoint folder")
    index_path = root / INDEX_NAME
    index_meta: dict[str, Any] = {}
    if index_path.exists():
        try:
            raw = index_path.read_bytes()
        except OSError as exc:
            raise ConversionError(f"{index_path}: cannot read ({exc.strerror})") from None
        if len(raw) > MAX_HEADER:
            raise ConversionError(f"{index_path}: {len(raw)} bytes is too large for an index")
        try:
            index = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{index_path}: not a readable JSON index ({exc})") from None
        except RecursionError:
            raise ConversionError(f"{index_path}: not a readable JSON index (nests too "
                                  "deeply)") from None
        except ValueError as exc:
            raise ConversionError(f"{index_path}: not a readable JSON index ({exc})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_path}: no weight_map")
        index_meta = index.get("metadata") or {}
        names = sorted({str(v) for v in weight_map.values()})
        paths = [_inside(root, name) for name in names]
        seen: dict[Path, str] = {}
        for name, path in zip(names, paths, strict=True):
            real = path.resolve()
            if real in seen:
                raise ConversionError(
                    f"{index_path}: shard {path.name} is listed under two names "
                    f"({seen[real]!r} and {name!r})")
            seen[real] = name
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise ConversionError(f"{index_path}: shard(s) missing: {', '.join(missing)}")
    else:
        paths = _unindexed(root)
        weight_map = None
        if not paths:
            raise ConversionError(f"{root}: no *.safetensors files")
    shards = [read_header(p) for p in paths]
    where: dict[str, Shard] = {}
    for shard in shards:
        for key in shard.entries:
            if key in where:
                raise ConversionError(f"{key!r} is in two shards: {where[key].path.name} and "
                                      f"{shard.path.name}", key=key)
            where[key] = shard
    if weight_map is not None:
        names_of = {id(s): s.path.name for s in shards}
        for key, name in weight_map.items():
            if key not in where:
                raise ConversionError(f"{index_path}: {key!r} is listed in {name} but no shard "
                                      "holds it", key=key)
            listed = str(name)
            if names_of[id(where[key])] != listed.rsplit("/", 1)[-1]:
                raise ConversionError(f"{index_path}: {key!r} is listed in {name} but lives in "
                                      f"{where[key].path.name}", key=key)
        unlisted = [k for k in where if k not in weight_map]
        if unlisted:
            raise ConversionError(f"{index_path}: {len(unlisted)} key(s) in the shards are not in "
                                  f"the index, e.g. {unlisted[0]!r}", key=unlisted[0])
    return Checkpoint(root, shards, where, index_meta)


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]],
                 metadata: Mapping[str, str]) -> bytes:
    """The header of a safetensors file holding ``(key, dtype, shape, nbytes)`` in order,
    padded to 8 bytes, with its length prefix."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset,
                                                                              offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        if n is None or n <= 0:  # pragma: no cover - a short write on a full disk raises
            raise OSError("short write")
        view = view[n:]
