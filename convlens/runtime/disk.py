"""Execute a plan on a safetensors checkpoint, streaming, into new shards.

Most outputs of a conversion are gathers of byte ranges of the inputs: a rename, a pass-through,
stacking along axis 0, a concat or split along any axis of a row-major tensor, an expert picked
out of a stacked tensor. Those are compiled to a list of (file, offset, length) segments and
copied through a small buffer with ``pread``/``pwrite`` (no tensor is built; :class:`_Copier`
says why not ``copy_file_range``). The rest (permutations, packing, checks, lossy steps) are
evaluated with torch on just the inputs of that output.
Memory stays bounded by the largest such group, not the checkpoint.

Shards are planned with huggingface_hub's shard splitter. Each is created with its header and
final size (every size is known from the plan); its tensors are cut into runs of about equal
bytes, which worker threads write at their offsets.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.compiler import plan as P
from convlens.errors import ConversionError
from convlens.runtime.report import RunReport
from convlens.runtime.safetensors_io import Checkpoint, header_bytes, write_all

if TYPE_CHECKING:  # imported by the torch path only: byte copies run without it (~200 MB less)
    import torch

Segment = tuple[Path, int, int]  # file, absolute offset, length
MAX_SEGMENTS = 65536  # beyond this a torch gather is faster than many small copies


@dataclass
class ShardPlan:
    name: str
    keys: list[str]

    def nbytes(self, plan: P.Plan) -> int:
        return sum(P.nbytes(plan.outputs[k].shape, plan.outputs[k].dtype) for k in self.keys)


@dataclass
class WriteStats:
    tensors: int = 0
    bytes: int = 0
    copied_tensors: int = 0  # written as byte ranges
    computed_tensors: int = 0  # evaluated with torch
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


def plan_shards(plan: P.Plan, max_shard_size: int | str) -> list[ShardPlan]:
    """Output shards in the hub's naming (``model-00001-of-00003.safetensors``)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        dict(plan.outputs), get_storage_size=lambda n: P.nbytes(n.shape, n.dtype),
        get_storage_id=lambda n: None, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size)
    order = {k: i for i, k in enumerate(plan.outputs)}
    return [ShardPlan(name, sorted(keys, key=order.__getitem__))
            for name, keys in split.filename_to_tensors.items()]


# --- byte-range gathers -----------------------------------------------------------------------


class _Segs:
    """A node's bytes as segments, with cumulative offsets for slicing (computed on the first
    slice of a node made of several ranges; most nodes are one range or are never sliced)."""

    __slots__ = ("_starts", "segs")

    def __init__(self, segs: list[Segment]) -> None:
        self.segs = segs
        self._starts: list[int] | None = None

    def take(self, start: int, length: int, out: list[Segment]) -> None:
        if length <= 0:
            return
        segs = self.segs
        if len(segs) == 1:  # one contiguous range: the slice is a range too
            path, off, _ = segs[0]
            _append(out, (path, off + start, length))
            return
        starts = self._starts
        if starts is None:
            starts, total = [], 0
            for seg in segs:
                starts.append(total)
                total += seg[2]
            self._starts = starts
        i = bisect_right(starts, start) - 1
        while length > 0:
            path, off, n = segs[i]
            skip = start - starts[i]
            m = min(n - skip, length)
            _append(out, (path, off + skip, m))
            start += m
            length -= m
            i += 1


def _append(out: list[Segment], seg: Segment) -> None:
    # paths are the checkpoint's own objects: identity is enough (PurePath.__eq__ is slow)
    if out and out[-1][0] is seg[0] and out[-1][1] + out[-1][2] == seg[1]:
        last = out[-1]
        out[-1] = (last[0], last[1], last[2] + seg[2])
    else:
        out.append(seg)
    if len(out) > MAX_SEGMENTS:
        raise _TooMany


class _TooMany(Exception):
    pass


def segments(node: P.Node, ckpt: Checkpoint, memo: dict[int, Any] | None = None
             ) -> list[Segment] | None:
    """The bytes of ``node`` as byte ranges of the input files, or None if it needs torch.
    ``memo`` keeps the segments of shared sub-expressions (the stacked tensor that all E
    reverted experts slice) across the outputs of one writer."""
    try:
        found = _segments(node, ckpt, {} if memo is None else memo)
    except _TooMany:
        return None
    return None if found is None else found.segs


def _segments(node: P.Node, ckpt: Checkpoint, memo: dict[int, Any]) -> _Segs | None:
    if type(node) is P.Load:  # most nodes (every expert of a stack): no memo needed
        shard = ckpt.where[node.key]
        e = shard.entries[node.key]
        return _Segs([(shard.path, e.start, e.end - e.start)] if e.end > e.start else [])
    key = id(node)
    if key in memo:
        return memo[key][1]  # type: ignore[no-any-return]
    found = _segments_of(node, ckpt, memo)
    memo[key] = (node, found)  # the node is kept alive, so its id stays unique
    return found


def _segments_of(node: P.Node, ckpt: Checkpoint, memo: dict[int, Any]) -> _Segs | None:
    size = P.DTYPE_SIZES[node.dtype]
    if isinstance(node, P.Load):
        e = ckpt.entry(node.key)
        return _Segs([(ckpt.where[node.key].path, e.start, e.nbytes)] if e.nbytes else [])
    if isinstance(node, P.Reshape):
        return _segments(node.arg, ckpt, memo)
    if isinstance(node, (P.Stack, P.Cat)):
        parts = [_segments(a, ckpt, memo) for a in node.args]
        if any(p is None for p in parts):
            return None
        outer = math.prod(node.shape[:node.dim])
        out: list[Segment] = []
        if outer == 1:  # along the first axis: the parts one after another
            for part in parts:
                assert part is not None
                for seg in part.segs:
                    _append(out, seg)
            return _Segs(out)
        chunks = [math.prod(a.shape[node.dim:]) * size for a in node.args]
        for i in range(outer):
            for part, chunk in zip(parts, chunks, strict=True):
                assert part is not None
                part.take(i * chunk, chunk, out)
        return _Segs(out)
    if isinstance(node, (P.Slice, P.Select)):
        src = _segments(node.arg, ckpt, memo)
        if src is None:
            return None
        shape = node.arg.shape
        row = math.prod(shape[node.dim + 1:]) * size
        outer = math.prod(shape[:node.dim])
        span = shape[node.dim] * row
        if isinstance(node, P.Select):
            start, stop, step = node.index, node.index + 1, 1
        else:
            start, stop, step = node.start, node.stop, node.step
        out = []
        for i in range(outer):
            if step == 1:
                src.take(i * span + start * row, (stop - start) * row, out)
            else:
                for j in range(start, stop, step):
                    src.take(i * span + j * row, row, out)
        return _Segs(out)
    return None


# --- torch evaluation of one output -----------------------------------------------------------


class _Reader:
    """Per-worker open files for the input shards."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, path: Path, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(self.fd(path), path, memoryview(buf), offset)
        return buf

    @staticmethod
    def read_into(fd: int, path: Path, view: memoryview, offset: int) -> None:
        done, length = 0, len(view)
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ConversionError(f"{path}: read error at byte {offset + done} (file shorter "
                                      "than its header says?)")
            done += n

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _load(reader: _Reader, ckpt: Checkpoint, key: str) -> torch.Tensor:
    import torch

    from convlens.runtime.dtypes import TORCH_DTYPES

    e = ckpt.entry(key)
    dtype = TORCH_DTYPES[e.dtype]
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=dtype)
    buf = reader.read(ckpt.where[key].path, e.start, e.nbytes)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(e.shape)


def _compute(key: str, node: P.Node, plan: P.Plan, ckpt: Checkpoint, reader: _Reader,
             report: RunReport | None) -> torch.Tensor:
    from convlens.runtime.execute import execute

    leaves = {leaf.key for leaf in P.leaves(node)}
    tensors = {k: _load(reader, ckpt, k) for k in leaves}
    one = P.Plan(plan.conversion, plan.direction, {key: node}, plan.rules)
    return execute(one, tensors, report)[key]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    import torch

    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


# --- writing ------------------------------------------------------------------------------------


COPY_BLOCK = 1 << 20  # bytes per read + write; measured against 256 KiB and 4 MiB (below)
_PAGE = 4096


class _Copier:
    """Copies byte ranges of the inputs to one output file through a 1 MiB buffer: ``pread``
    of the ranges one after another into the buffer, one ``pwrite`` per full buffer.

    Why not ``os.copy_file_range``: on this machine (BENCHMARKS.md) it moved page-cache data at
    1.0-1.8 GB/s unless source and destination offsets sit at the same place in a page (2.9
    GB/s), and safetensors offsets are only 8-byte aligned, so a range and its destination are
    mostly out of phase. Through a buffer the phase is ours to choose: the copy from the page
    cache into the buffer and the copy out of it each run at memcpy speed unless their two
    addresses are a few bytes apart modulo 4 KiB (4K aliasing stalls the CPU's loads), so the
    buffer's start is put half a page away from both (2.8-3.3 GB/s of CPU time in every phase
    measured). Small ranges (one expert's 28 KiB scale) share a buffer, so they cost one read
    each and their writes are batched."""

    def __init__(self, reader: _Reader, out_fd: int) -> None:
        self.reader = reader
        self.out_fd = out_fd
        self.buf = mmap.mmap(-1, COPY_BLOCK + _PAGE)  # page-aligned, unlike a bytearray
        self.view = memoryview(self.buf)
        self.base = 0  # where the pending bytes start in the buffer
        self.fill = 0  # pending bytes
        self.at = 0  # their destination offset

    def copy(self, segs: list[Segment], at: int) -> None:
        """Copy ``segs`` one after another to the output from byte ``at`` on."""
        if self.fill and self.at + self.fill != at:
            self.flush()
        for path, offset, length in segs:
            fd = self.reader.fd(path)
            while length > 0:
                if not self.fill:
                    self.base = _buffer_phase(offset, at)
                    self.at = at
                k = min(length, COPY_BLOCK - self.fill)
                start = self.base + self.fill
                self.reader.read_into(fd, path, self.view[start:start + k], offset)
                self.fill += k
                offset += k
                length -= k
                at += k
                if self.fill == COPY_BLOCK:
                    self.flush()

    def close(self) -> None:
        # after an error, slices of the buffer may live on in the traceback's frames: the
        # mapping is then unmapped when they go
        with contextlib.suppress(BufferError):
            self.view.release()
            self.buf.close()

    def flush(self) -> None:
        if self.fill:
            _pwrite_all(self.out_fd, self.view[self.base:self.base + self.fill], self.at)
            self.at += self.fill
            self.fill = 0


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while view:
        n = os.pwrite(fd, view, at)
        view = view[n:]
        at += n


def _buffer_phase(src: int, dst: int) -> int:
    """A buffer offset (within a page) whose distance modulo the page to both ``src`` and
    ``dst`` is large: half of their difference, or that plus half a page, whichever is farther
    from a page boundary."""
    half = ((dst - src) % _PAGE) // 2
    best = max(((src + x) % _PAGE for x in (half, half + _PAGE // 2)),
               key=lambda b: min((b - src) % _PAGE, (src - b) % _PAGE,
                                 (dst - b) % _PAGE, (b - dst) % _PAGE))
    return best & ~15  # keep it 16-byte aligned


WRITEBACK_EVERY = 256 << 20  # durable runs start the disk write-back of each 256 MiB written


def _start_writeback(fd: int, start: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``start`` to disk now,
    without waiting (Linux starts write-back for POSIX_FADV_DONTNEED on dirty pages), so that
    the final fsync finds little left to do and the disk works while later bytes are copied."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # advisory only
            advise(fd, start, length, os.POSIX_FADV_DONTNEED)


@dataclass
class _Piece:
    """A run of one shard's tensors, written by one worker at their offsets in the file."""

    path: Path
    keys: list[str]
    start: int  # file offset of the first tensor
    nbytes: int


def start_shard(shard: ShardPlan, plan: P.Plan, folder: Path, metadata: Mapping[str, str],
                pieces: int) -> list[_Piece]:
    """Create a shard file with its header and final size; its tensors split into ``pieces``
    contiguous runs of about equal bytes."""
    entries = []
    for key in shard.keys:
        n = plan.outputs[key]
        entries.append((key, n.dtype, n.shape, P.nbytes(n.shape, n.dtype)))
    path = folder / shard.name
    header = header_bytes(entries, metadata)
    total = sum(e[3] for e in entries)
    with path.open("wb", buffering=0) as f:
        write_all(f, header)
        f.truncate(len(header) + total)
    out: list[_Piece] = []
    at = done = 0
    for key, _, _, nbytes in entries:
        # a tensor goes to the run its first byte falls in: runs differ by one tensor at most
        index = min(pieces - 1, done * pieces // total) if total else 0
        if not out or (index > len(out) - 1 and out[-1].keys):
            out.append(_Piece(path, [], len(header) + at, 0))
        out[-1].keys.append(key)
        out[-1].nbytes += nbytes
        at += nbytes
        done += nbytes
    return out or [_Piece(path, [], len(header), 0)]


def write_piece(piece: _Piece, plan: P.Plan, ckpt: Checkpoint, report: RunReport | None,
                progress: Callable[[int], None], stats: WriteStats, lock: threading.Lock,
                durable: bool = False) -> None:
    reader = _Reader()
    fd = os.open(piece.path, os.O_WRONLY)
    copier = _Copier(reader, fd)
    try:
        at = piece.start
        kicked = at
        memo: dict[int, Any] = {}
        for key in piece.keys:
            node = plan.outputs[key]
            nbytes = P.nbytes(node.shape, node.dtype)
            segs = segments(node, ckpt, memo)  # None: a node only torch computes
            if segs is not None:
                copier.copy(segs, at)
                copied = True
            else:
                copier.flush()
                data = _tensor_bytes(_compute(key, node, plan, ckpt, reader, report))
                if len(data) != nbytes:  # pragma: no cover - the planner fixed the size
                    raise ConversionError(f"{key}: computed {len(data)} bytes, planned {nbytes}",
                                          key=key)
                _pwrite_all(fd, data, at)
                copied = False
            with lock:
                stats.tensors += 1
                stats.bytes += nbytes
                if copied:
                    stats.copied_tensors += 1
                else:
                    stats.computed_tensors += 1
            progress(nbytes)
            at += nbytes
            if durable and at - kicked >= WRITEBACK_EVERY:
                copier.flush()  # the range's last bytes may still be in the copy buffer
                _start_writeback(fd, kicked, at - kicked)
                kicked = at
        copier.flush()
    finally:
        copier.close()
        os.close(fd)
        reader.close()


# Nodes whose value depends on data (checks, lossy steps), or that move more than byte ranges
TORCH_NODES = (P.Same, P.Verify, P.Reduce, P.Rescale, P.Const, P.Unpack, P.Pack, P.Take,
               P.Permute, P.Shift)


def _needs_torch(node: P.Node) -> bool:
    """Nodes whose value depends on data (checks, lossy steps) always go through torch."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, TORCH_NODES):
            return True
        stack.extend(P.children(n))
    return False


def largest_computed(plan: P.Plan) -> tuple[int, str]:
    """The memory the largest torch-evaluated output needs (its inputs, once each, plus twice
    its own size for intermediates and the result) and its key; byte-range outputs need none."""
    best, where = 0, ""
    if not any(issubclass(k, TORCH_NODES) for k in plan.kinds()):
        return best, where  # every output is byte ranges
    for key, node in plan.outputs.items():
        if not _needs_torch(node):
            continue
        inputs = {leaf.key: P.nbytes(leaf.shape, leaf.dtype) for leaf in P.leaves(node)}
        need = sum(inputs.values()) + 2 * P.nbytes(node.shape, node.dtype)
        if need > best:
            best, where = need, key
    return best, where


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _nothing(*args: Any) -> None:
    pass


def write_checkpoint(plan: P.Plan, ckpt: Checkpoint, folder: Path, shards: list[ShardPlan],
                     metadata: Mapping[str, str], *, workers: int = 1,
                     report: RunReport | None = None, quiet: bool = True,
                     durable: bool = False) -> WriteStats:
    """Write every output shard of ``plan`` into ``folder`` (which must exist). ``durable``:
    each shard is on disk (fsync) before this returns, not only in the page cache."""
    stats = WriteStats(shards=[s.name for s in shards])
    total = sum(s.nbytes(plan) for s in shards)
    lock = threading.Lock()
    close: Callable[[], None] = _nothing
    progress: Callable[[int], None] = _nothing
    if not quiet:  # only a shown bar imports tqdm (~20 ms)
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
                   dynamic_ncols=True)
        close = bar.close

        def progress(n: int) -> None:
            with lock:
                bar.update(n)

    start = time.perf_counter()
    try:
        # each shard in runs of tensors, so that workers share a shard when there are few
        per_shard = max(1, -(-workers // max(1, len(shards)))) if workers > 1 else 1
        pieces = [p for shard in shards
                  for p in start_shard(shard, plan, folder, metadata, per_shard)]
        if workers <= 1 or len(pieces) == 1:
            for piece in pieces:
                write_piece(piece, plan, ckpt, report, progress, stats, lock, durable)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(write_piece, piece, plan, ckpt, report, progress, stats,
                                       lock, durable) for piece in pieces]
                for fut in futures:
                    fut.result()
        if durable:
            for shard in shards:
                fd = os.open(folder / shard.name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    finally:
        close()
    stats.seconds = time.perf_counter() - start
    return stats


# --- verification -------------------------------------------------------------------------------


@dataclass
class VerifyStats:
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    mismatches: list[str] = field(default_factory=list)


def _expected(key: str, node: P.Node, plan: P.Plan, ckpt: Checkpoint, reader: _Reader,
              memo: dict[int, Any]) -> Any:
    """The bytes ``node`` must have, as chunks (read lazily for byte-range gathers)."""
    segs = segments(node, ckpt, memo)
    if segs is None:
        yield bytes(_tensor_bytes(_compute(key, node, plan, ckpt, reader, None)))
        return
    for path, offset, length in segs:
        done = 0
        while done < length:
            n = min(length - done, 64 << 20)
            yield bytes(reader.read(path, offset + done, n))
            done += n


def verify_outputs(plan: P.Plan, src: Checkpoint, dst: Checkpoint, *, workers: int = 1
                   ) -> VerifyStats:
    """Recompute every output of ``plan`` from ``src`` and compare it with ``dst`` byte for
    byte, without trusting whatever wrote ``dst``."""
    stats = VerifyStats()
    want_keys, got_keys = set(plan.outputs), set(dst.where)
    for key in sorted(want_keys - got_keys)[:20]:
        stats.mismatches.append(f"{key}: missing from the destination")
    for key in sorted(got_keys - want_keys)[:20]:
        stats.mismatches.append(f"{key}: in the destination, but the conversion makes no such "
                                "tensor")
    lock = threading.Lock()

    def check(keys: list[str]) -> None:
        reader = _Reader()
        memo: dict[int, Any] = {}
        try:
            for key in keys:
                node, entry = plan.outputs[key], dst.entry(key)
                problem = None
                if (entry.dtype, entry.shape) != (node.dtype, node.shape):
                    problem = (f"{key}: {entry.dtype}{list(entry.shape)} in the destination, "
                               f"{node.dtype}{list(node.shape)} expected")
                else:
                    at = entry.start
                    for chunk in _expected(key, node, plan, src, reader, memo):
                        got = reader.read(dst.where[key].path, at, len(chunk))
                        if got != chunk:
                            problem = f"{key}: bytes differ from the recomputed tensor"
                            break
                        at += len(chunk)
                with lock:
                    stats.tensors += 1
                    stats.bytes += entry.nbytes
                    if problem:
                        stats.mismatches.append(problem)
        finally:
            reader.close()

    start = time.perf_counter()
    common = [k for k in plan.outputs if k in got_keys]
    if workers <= 1:
        check(common)
    else:
        batches = [common[i::workers] for i in range(workers)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(check, b) for b in batches]:
                fut.result()
    stats.seconds = time.perf_counter() - start
    return stats
