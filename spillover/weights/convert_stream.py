"""The converter's fast path: stream one planned tensor from the source file into its shard by rows.

Float (bf16/fp16/fp32/FP8) matrices going to int4/int8, and tensors kept as they are, never exist
whole in memory: a few MB of rows are read straight into a reused buffer, widened to float32 in a
reused scratch, packed by `RowPacker` (bit-identical to whole-tensor RTN, see its tests) and written
at their final offsets in the shard. Peak memory is a few chunks per worker, whatever the tensor's
size. Everything else (GGUF blocks, pre-quantized checkpoint modules, FP8 kept as FP8) returns False
and takes `produce()`'s whole-tensor path.

Chunks run on worker threads that each do single-threaded torch ops (see `_Workers`): one OpenMP
team per op made every op wait for a descheduled thread whenever the machine had other work
(docs/kernel_notes.md, "Converter speed and peak RSS"), and a chunk's reads and writes now overlap
another chunk's packing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from spillover.quant.packing import CHUNK_ELEMS, RowPacker
from spillover.weights.store import ShardWriter, StoreError, sha256_file

if TYPE_CHECKING:
    from spillover.quant.importers.source import Source, TensorReader
    from spillover.weights.convert import Planned

COPY_CHUNK = 8 << 20  # bytes per read+write when a tensor is kept as stored
MIN_CHUNK_ELEMS = 1 << 15  # below this, splitting a tensor across workers costs more than it saves
FP8_BLOCK = 128
WORKERS: int | None = None  # threads per conversion; None: torch.get_num_threads()
SYNC_EVERY = 64 << 20  # bytes streamed between background fdatasync kicks


class Streamer:
    """Streams planned tensors into one shard; `workers` defaults to torch's intra-op thread count.

    `write` only queues a tensor's chunks (experts are a chunk or two each: waiting for every tensor
    would leave workers idle and pay a thread hand-off per tensor), so use it as a context manager:
    leaving the `with` waits until every chunk is in the file, and on an error first cancels what
    has not started, so nothing writes into the shard after the caller moves on.
    """

    def __init__(self, workers: int | None = None, chunk_elems: int | None = None) -> None:
        self.chunk_elems = chunk_elems or CHUNK_ELEMS
        self.workers = max(1, workers or WORKERS or torch.get_num_threads())
        self._local = threading.local()
        self._unsynced = 0
        self._syncing: threading.Thread | None = None
        # Queued tensors, oldest first: their chunk futures and the reader they share.
        self._queued: deque[tuple[list[Future[None]], TensorReader]] = deque()
        self._in_flight = 0  # queued chunks; bounded so open readers and queued work stay small

    def __enter__(self) -> Streamer:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            for futs, _ in self._queued:
                for f in futs:
                    f.cancel()
        self._drain(0, raise_errors=exc_type is None)

    def write(self, source: Source, p: Planned, writer: ShardWriter) -> bool:
        """Write all of `p`'s parts; False (nothing written) if `p` needs the whole-tensor path."""
        t = p.src
        if p.entry is not None or t.gguf_type is not None or not t.dtype.is_floating_point:
            return False
        if p.fmt == "dense" and p.scale is None and set(p.parts) == {"weight"}:
            spec = p.parts["weight"]
            if spec.dtype != t.dtype or tuple(spec.shape) != tuple(t.shape):
                return False
            job: Callable[[TensorReader, int, int, int], None] = partial(
                self._copy_chunk, writer, spec.key)
            ranges = [(b, min(t.nbytes, b + COPY_CHUNK)) for b in range(0, t.nbytes, COPY_CHUNK)]
        elif p.fmt in ("int4", "int8") and len(t.shape) in (2, 3):
            pack = self._pack_job(source, p, writer)
            if pack is None:
                return False
            job = pack
            ranges = _row_ranges(prod(t.shape[:-1]), t.shape[-1], self.chunk_elems, self.workers)
        else:
            return False
        # Chunks go in with pwrite on the writer's descriptor: positioned, so from any thread and
        # beside the main thread's buffered writes of whole-tensor parts (other byte ranges).
        fd = writer.f.fileno()
        r = source.reader(t)
        jobs = [partial(job, r, fd, a, b) for a, b in ranges]
        if self.workers == 1:
            with r:
                for j in jobs:
                    j()
        else:
            self._queued.append((_workers(self.workers).submit(jobs), r))
            self._in_flight += len(jobs)
            self._drain(4 * self.workers)
        for spec in p.parts.values():
            writer.pending.discard(spec.key)
        self._kick_sync(fd, p.nbytes())
        return True

    def _drain(self, keep: int, raise_errors: bool = True) -> None:
        """Wait for the oldest queued tensors until at most `keep` chunks are queued."""
        error: BaseException | None = None
        while self._queued and (self._in_flight > keep or error is not None):
            futs, r = self._queued.popleft()
            wait(futs)
            r.close()
            self._in_flight -= len(futs)
            for f in futs:
                if error is None and not f.cancelled() and f.exception() is not None:
                    error = f.exception()
                    for later, _ in self._queued:  # the shard is lost anyway: stop its work
                        for g in later:
                            g.cancel()
        if error is not None and raise_errors:
            raise error

    def _kick_sync(self, fd: int, nbytes: int) -> None:
        """Start writing dirty pages back while packing goes on, so the shard's closing fsync (which
        durability needs) finds little left to write."""
        self._unsynced += nbytes
        if self._unsynced < SYNC_EVERY or (self._syncing is not None and self._syncing.is_alive()):
            return
        self._unsynced = 0
        own = os.dup(fd)  # stays valid however soon the writer closes its descriptor
        self._syncing = threading.Thread(target=_fdatasync, args=(own,),
                                         name="spillover-convert-sync", daemon=True)
        self._syncing.start()

    # ---- kept tensors: bytes as they are ---------------------------------------------------------
    def _copy_chunk(self, writer: ShardWriter, key: str, r: TensorReader, fd: int, b0: int,
                    b1: int) -> None:
        pwrite_part(writer, fd, key, b0, r.read_into(self._raw(b1 - b0), b0))

    # ---- int4 / int8 -----------------------------------------------------------------------------
    def _pack_job(self, source: Source, p: Planned,
                  writer: ShardWriter) -> Callable[..., None] | None:
        t = p.src
        k = t.shape[-1]
        bits = 4 if p.fmt == "int4" else 8
        # The same arguments as produce() -> pack_weight(): int8 is per channel there,
        # scales float16.
        group = int(p.meta["group_size"]) if bits == 4 else k
        sym = bool(p.meta["symmetric"])
        if k % group or k % 2:
            return None
        layout = RowPacker(bits, group, sym, torch.float16).part_dtypes(k)
        if set(layout) != set(p.parts) or any(
                (p.parts[n].dtype, tuple(p.parts[n].shape)) != (dt, (*t.shape[:-1], c))
                for n, (dt, c) in layout.items()):
            return None
        dequant = None
        if p.scale is not None:
            dequant = _Fp8Rows.of(source, p)
            if dequant is None:
                return None
        keys = {n: p.parts[n].key for n in layout}
        return partial(self._pack_chunk, writer, keys, (bits, group, sym), dequant, t.dtype, k)

    def _pack_chunk(self, writer: ShardWriter, keys: dict[str, str], fmt: tuple[int, int, bool],
                    dequant: _Fp8Rows | None, dtype: torch.dtype, k: int, r: TensorReader, fd: int,
                    r0: int, r1: int) -> None:
        n, row_bytes = r1 - r0, k * dtype.itemsize
        packer = self._packer(*fmt)
        raw = r.read_into(self._raw(n * row_bytes), r0 * row_bytes)
        x = packer.scratch(n, k).copy_(raw.view(dtype).view(n, k))
        if dequant is not None:
            dequant.apply(x, r0)
        outs = {name: self._out(name, n, c, dt) for name, (dt, c) in packer.part_dtypes(k).items()}
        packer.pack_into(x, outs)
        for name, v in outs.items():
            pwrite_part(writer, fd, keys[name], r0 * v.shape[1] * v.element_size(), v)

    # ---- per-thread buffers, reused across chunks and tensors ------------------------------------
    def _raw(self, nbytes: int) -> torch.Tensor:
        buf: torch.Tensor | None = getattr(self._local, "raw", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.raw = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]

    def _out(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        outs: dict[str, torch.Tensor] = self._local.__dict__.setdefault("outs", {})
        b = outs.get(name)
        if b is None or b.numel() < rows * cols or b.dtype != dtype:
            b = outs[name] = torch.empty(rows * cols, dtype=dtype)
        return b[:rows * cols].view(rows, cols)

    def _packer(self, bits: int, group: int, sym: bool) -> RowPacker:
        packers: dict[tuple[int, int, bool], RowPacker] = self._local.__dict__.setdefault(
            "packers", {})
        if (bits, group, sym) not in packers:
            packers[bits, group, sym] = RowPacker(bits, group, sym, torch.float16, self.chunk_elems)
        return packers[bits, group, sym]


def _row_ranges(rows: int, k: int, chunk_elems: int, workers: int) -> list[tuple[int, int]]:
    """Row chunks of about `chunk_elems`, at least one per worker when the tensor is big enough to
    split (experts are often a single chunk), a multiple of `workers` so none idles at the end."""
    if rows == 0:
        return []
    n = max(-(-rows * k // chunk_elems), workers)
    n = -(-n // workers) * workers
    n = max(1, min(n, rows, rows * k // MIN_CHUNK_ELEMS))
    step = -(-rows // n)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


class _Fp8Rows:
    """Row-chunk form of `dequant_fp8_block_ref` (w = fp8 * scale of its 128x128 block),
    same products."""

    def __init__(self, scale: torch.Tensor, n: int, k: int) -> None:
        self.scale = scale.float().reshape(-1, scale.shape[-1])  # [lead * N/128, K/128]
        self.n, self.k, self.nrb = n, k, scale.shape[-2]

    @classmethod
    def of(cls, source: Source, p: Planned) -> _Fp8Rows | None:
        assert p.scale is not None
        t = p.src
        n, k = t.shape[-2:]
        scale = source.read(p.scale)
        if t.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (
                *t.shape[:-2], -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)):
            return None  # produce() decides what an odd pairing means
        return cls(scale, n, k)

    def apply(self, x: torch.Tensor, r0: int) -> None:
        r = torch.arange(r0, r0 + x.shape[0])
        rows = self.scale[(r // self.n) * self.nrb + (r % self.n) // FP8_BLOCK]
        x.mul_(rows.repeat_interleave(FP8_BLOCK, dim=1)[:, :self.k])


class ShardFinisher:
    """Checksums finished shards and writes their done-markers on a thread of its own, so hashing
    shard i (a full re-read) overlaps packing shard i + 1. Leaving the `with` waits for all of it,
    also on errors, so no marker appears after the caller has moved on."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spillover-convert-sha")
        self._futs: list[Future[None]] = []

    def submit(self, shard: Path, marker: Path) -> None:
        self._futs.append(self._pool.submit(mark_done, shard, marker))

    def __enter__(self) -> ShardFinisher:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._pool.shutdown(wait=True)
        if exc_type is None:
            for f in self._futs:
                f.result()


def mark_done(shard: Path, marker: Path) -> None:
    """The resume marker: written only once the (fsynced, renamed) shard's checksum is known."""
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(sha256_file(shard) + "\n")
    os.replace(tmp, marker)


def _fdatasync(fd: int) -> None:
    # Only a head start: the writer's own fsync at close is what makes the shard durable.
    try:
        with contextlib.suppress(OSError):
            os.fdatasync(fd)
    finally:
        os.close(fd)


def pwrite_part(writer: ShardWriter, fd: int, key: str, byte_offset: int,
                tensor: torch.Tensor) -> None:
    """Write `tensor`'s bytes (typed, or raw uint8) at `byte_offset` inside part `key` of the shard.

    Positioned writes on the writer's descriptor: chunks may land in any order from any thread, and
    they leave the file offset alone, so the writer's own (seek + buffered write) parts stay right.
    The caller marks the part written once all of it is queued and waits for it before closing.
    """
    off, spec = writer.offsets[key]
    data = tensor.contiguous().reshape(-1).view(torch.uint8)
    if tensor.dtype not in (spec.dtype, torch.uint8) or byte_offset + data.numel() > spec.nbytes:
        raise StoreError(f"{key}: {tensor.dtype} write of {data.numel()} bytes at {byte_offset} "
                         f"does not fit the planned {spec.dtype} {spec.shape}")
    view, pos, done = data.numpy().data, writer.data_start + off + byte_offset, 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], pos + done)


class _Workers:
    """Daemon threads running single-threaded torch ops, shared by the process's conversions.

    torch's intra-op setting is per thread once a thread has run its first op, but `set_num_threads`
    also sets the process default; each worker sets 1 and initialises, then the caller's value is
    put back, so the rest of the process keeps its threads.
    """

    def __init__(self, n: int) -> None:
        self.q: queue.SimpleQueue[tuple[Callable[[], None], Future[None]]] = queue.SimpleQueue()
        ready = threading.Semaphore(0)
        before = torch.get_num_threads()
        for i in range(n):
            threading.Thread(target=self._loop, args=(ready,), name=f"spillover-convert-{i}",
                             daemon=True).start()
        for _ in range(n):
            ready.acquire()
        torch.set_num_threads(before)

    def _loop(self, ready: threading.Semaphore) -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # makes this thread's setting now, from the 1 just set
        ready.release()
        while True:
            job, fut = self.q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                job()
                fut.set_result(None)
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

    def submit(self, jobs: Sequence[Callable[[], None]]) -> list[Future[None]]:
        futs: list[Future[None]] = []
        for job in jobs:
            futs.append(Future())
            self.q.put((job, futs[-1]))
        return futs

    def run(self, jobs: Sequence[Callable[[], None]]) -> None:
        """Run `jobs`; returns when none is running any more, raising the first failure."""
        futs = self.submit(jobs)
        try:
            wait(futs)
        except BaseException:
            for f in futs:
                f.cancel()
            wait(futs)
            raise
        for f in futs:
            f.result()


_POOLS: dict[int, _Workers] = {}
_POOLS_LOCK = threading.Lock()


def _workers(n: int) -> _Workers:
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = _Workers(n)
        return _POOLS[n]
