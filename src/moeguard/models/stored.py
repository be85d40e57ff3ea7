"""Safetensors files read and written as a stream of bytes, tensor by tensor.

A checkpoint of a real MoE is larger than memory, and a memory map of it counts its
touched pages as the process's resident memory. Here a file is read front to back by
a read-ahead thread (``os.preadv`` into a few reused buffers: the resident memory is
those buffers), every tensor's digest is computed from its stored bytes, and copies
are written by :class:`SafetensorsWriter`, which writes the header first (every size
is known in advance) and then the data in order, and makes the file durable before it
counts as written. Pages read or written are dropped from the page cache
(``posix_fadvise``) once used, so one pass over a checkpoint does not evict everyone
else's cached files; reading overlaps hashing (``hashlib`` releases the GIL).

Layout of a safetensors file: an 8-byte little-endian header length ``N``, ``N``
bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus
``"__metadata__"``), then the data section, where the tensors lie contiguously.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeguard.errors import ModelError

# safetensors dtype name -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CHUNK_BYTES = 16 << 20  # one read or write; a few of these are all a stream holds in memory
READERS = 2
BUFFERS_PER_READER = 3
WRITE_BEHIND = 2
HASH_WORKERS = 2
ALIGNMENT = 4096  # of O_DIRECT offsets, lengths and buffers
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, known from the header alone; ``begin`` is its offset in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    begin: int = 0


@dataclass(frozen=True)
class StoredFile:
    """A safetensors file's header: its tensors in data order, its metadata, where the data starts."""

    path: Path
    tensors: list[StoredTensor]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def digest_header(name: str, dtype: torch.dtype, shape: Sequence[int]) -> bytes:
    """What a tensor digest hashes before the tensor's bytes: ``name|dtype|shape`` and a newline."""
    return f"{name}|{str(dtype).removeprefix('torch.')}|{tuple(int(s) for s in shape)}\n".encode()


def _element_size(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def read_header(path: Path) -> StoredFile:
    """The header of the safetensors file ``path``, checked: known dtypes, sizes that match the shapes,
    tensors lying contiguously over the whole data section (as safetensors writes them)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"{path} is not a readable safetensors file ({error}).") from None
    try:
        metadata = header.pop("__metadata__", None) or {}
        tensors = []
        for name, info in header.items():
            begin, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
            dtype = info["dtype"]
            if dtype not in DTYPES:
                raise ValueError(f"tensor {name} has dtype {dtype!r}, which moeguard does not read")
            if end - begin != math.prod(shape) * _element_size(dtype) or min(shape, default=0) < 0:
                raise ValueError(f"tensor {name} takes bytes {begin}..{end}, which does not fit its shape {list(shape)}")
            tensors.append(StoredTensor(name, dtype, shape, end - begin, begin))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path} is not a readable safetensors file (malformed header: {error}).") from None
    tensors.sort(key=lambda t: (t.begin, t.nbytes))
    position = 0
    for tensor in tensors:
        if tensor.begin != position:
            raise ModelError(f"{path}: tensor {tensor.name} starts at byte {tensor.begin} of the data, expected {position} "
                             "(tensors overlap or leave gaps); the file is damaged.")
        position += tensor.nbytes
    data_start = 8 + length
    if data_start + position != size:
        raise ModelError(f"{path} holds {size - data_start} bytes of tensor data, but its header describes {position}; "
                         "the file is damaged or truncated. Copy or download it again.")
    return StoredFile(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start)


def _drop_from_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _round_up(value: int, multiple: int = ALIGNMENT) -> int:
    return -(-value // multiple) * multiple


def _open_direct(path: Path, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """``(fd, direct)``: ``path`` opened with ``O_DIRECT`` (no page cache) where the filesystem allows it."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, mode), True
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def _open_for_reading(path: Path) -> tuple[int, bool]:
    """``(fd, direct)``: opened with ``O_DIRECT`` if the filesystem takes direct reads (probed with one read)."""
    fd, direct = _open_direct(path, os.O_RDONLY)
    if direct:
        probe = mmap.mmap(-1, ALIGNMENT)
        try:
            os.preadv(fd, [probe], 0)
        except OSError as error:
            if error.errno != errno.EINVAL:
                os.close(fd)
                raise
            os.close(fd)
            fd, direct = os.open(path, os.O_RDONLY), False
        finally:
            probe.close()
    return fd, direct


def read_ahead(path: Path, start: int, end: int, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[memoryview, Callable[[], None]]]:
    """Bytes ``start..end`` of ``path`` in consecutive ``(chunk, release)`` pairs, read ahead by background threads.

    ``READERS`` threads read every ``READERS``-th block, so that as many requests are
    in flight (one request at a time leaves a virtual disk idle between them). Reads
    are aligned blocks with ``O_DIRECT`` where the filesystem supports it (straight
    from the disk into page-aligned buffers, bypassing the page cache), else buffered
    reads whose pages are dropped from the cache once used. A chunk is valid until
    ``release()`` is called; each reader has ``BUFFERS_PER_READER`` buffers and waits
    for releases, which bounds the memory.
    """
    first = start // ALIGNMENT * ALIGNMENT
    chunk_bytes = _round_up(max(1, min(chunk_bytes, end - first)))
    blocks = -(-(end - first) // chunk_bytes)
    readers = max(1, min(READERS, blocks))
    fd, direct = _open_for_reading(path)
    if not direct and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
    free: list[queue.Queue] = [queue.Queue() for _ in range(readers)]
    for pool in free:
        for _ in range(BUFFERS_PER_READER):
            pool.put(mmap.mmap(-1, chunk_bytes))  # page-aligned, as O_DIRECT needs
    stop = threading.Event()
    ready: dict[int, Any] = {}  # block number -> (view, offset, buffer); -1 -> a reader's error
    arrived = threading.Condition()

    def reader(number: int) -> None:
        try:
            for block in range(number, blocks, readers):
                buffer = free[number].get()
                if stop.is_set():
                    return
                offset = first + block * chunk_bytes
                view = memoryview(buffer)[: min(chunk_bytes, _round_up(end - offset))]
                done = 0
                while offset + done < end and done < len(view):
                    count = os.preadv(fd, [view[done:]], offset + done)
                    if count == 0:
                        raise EOFError(f"{path} ends at byte {offset + done}, before byte {end}")
                    done += count
                lower = max(start - offset, 0)
                with arrived:
                    ready[block] = (view[lower : min(done, end - offset)], offset + lower, buffer)
                    arrived.notify_all()
        except BaseException as error:  # handed to the consumer, which raises it
            with arrived:
                ready[-1] = error
                arrived.notify_all()

    closing = threading.Lock()  # a chunk released after the end must not touch the closed descriptor
    closed = False

    def releaser(block: int, offset: int, length: int, buffer: mmap.mmap) -> Callable[[], None]:
        def release() -> None:
            with closing:
                if not direct and not closed:
                    _drop_from_cache(fd, offset, length)
            free[block % readers].put(buffer)
        return release

    threads = [threading.Thread(target=reader, args=(n,), name="moeguard-read-ahead", daemon=True) for n in range(readers)]
    for thread in threads:
        thread.start()
    try:
        for block in range(blocks):
            with arrived:
                while block not in ready and -1 not in ready:
                    arrived.wait()
                if -1 in ready:
                    raise ready.pop(-1)
                view, offset, buffer = ready.pop(block)
            yield view, releaser(block, offset, len(view), buffer)
    finally:
        stop.set()
        for pool in free:
            pool.put(mmap.mmap(-1, ALIGNMENT))  # wakes a reader waiting for a buffer
        for thread in threads:
            thread.join()
        with closing:
            closed = True
            os.close(fd)


class _Hasher(threading.Thread):
    """Hashes the pieces of its share of the tensors, in order; releases a chunk's hold when done with it."""

    def __init__(self, digests: dict[str, str]) -> None:
        super().__init__(name="moeguard-hash", daemon=True)
        self.jobs: queue.Queue = queue.Queue()
        self.digests = digests
        self.error: BaseException | None = None
        self.current = hashlib.sha256()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            pieces, done = job
            try:
                if self.error is None:
                    for tensor, position, piece in pieces:
                        if position == 0:
                            self.current = hashlib.sha256(digest_header(tensor.name, DTYPES[tensor.dtype], tensor.shape))
                        self.current.update(piece)
                        if position + len(piece) == tensor.nbytes:
                            self.digests[tensor.name] = self.current.hexdigest()
            except BaseException as error:  # raised by the stream
                self.error = error
            done()


class TensorStream:
    """The tensors of a safetensors file as ``(tensor, position in the tensor, bytes)`` pieces in data order,
    each tensor's SHA-256 (:func:`digest_header` + its bytes) computed on the way by ``workers`` threads.

    A tensor arrives in one or more consecutive pieces (an empty tensor in one empty
    piece); a piece is valid until the next one is asked for. Tensors are shared out to
    the hashing threads by size, so hashing uses every core while the next chunks are
    read. :attr:`digests` is complete once the iteration has ended.
    """

    def __init__(self, stored: StoredFile, *, workers: int = HASH_WORKERS, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.stored = stored
        self.chunk_bytes = chunk_bytes
        self.digests: dict[str, str] = {}
        self.owner: dict[str, int] = {}
        load = [0] * max(1, workers)
        for tensor in stored.tensors:  # the least loaded thread takes the next tensor
            worker = load.index(min(load))
            self.owner[tensor.name] = worker
            load[worker] += tensor.nbytes + 4096
        self.workers = len(load)

    def _pieces(self, chunks: Iterator[tuple[memoryview, Callable[[], None]]]) -> Iterator[
            tuple[list[tuple[StoredTensor, int, memoryview]], Callable[[], None]]]:
        """The pieces of each chunk, with the chunk's release."""
        tensors = iter(self.stored.tensors)
        tensor, position = next(tensors, None), 0
        for chunk, release in chunks:
            pieces = []
            while len(chunk):
                while tensor is not None and tensor.nbytes == 0:
                    pieces.append((tensor, 0, memoryview(b"")))
                    tensor, position = next(tensors, None), 0
                piece = chunk[: tensor.nbytes - position]
                chunk = chunk[len(piece):]
                pieces.append((tensor, position, piece))
                position += len(piece)
                if position == tensor.nbytes:
                    tensor, position = next(tensors, None), 0
            yield pieces, release
        tail = []
        while tensor is not None:  # empty tensors after the last byte
            tail.append((tensor, 0, memoryview(b"")))
            tensor = next(tensors, None)
        if tail:
            yield tail, lambda: None

    def __iter__(self) -> Iterator[tuple[StoredTensor, int, memoryview]]:
        start = self.stored.data_start
        size = self.stored.data_bytes
        chunks = read_ahead(self.stored.path, start, start + size, chunk_bytes=self.chunk_bytes) if size else iter(())
        hashers = [_Hasher(self.digests) for _ in range(self.workers)]
        for hasher in hashers:
            hasher.start()
        try:
            for pieces, release in self._pieces(chunks):
                shares: list[list] = [[] for _ in hashers]
                for item in pieces:
                    shares[self.owner[item[0].name]].append(item)
                holds = [sum(1 for share in shares if share) + 1]  # the hashers with work here, and this loop
                lock = threading.Lock()

                def done(holds: list[int] = holds, lock: threading.Lock = lock, release: Callable = release) -> None:
                    with lock:
                        holds[0] -= 1
                        last = holds[0] == 0
                    if last:
                        release()

                for hasher, share in zip(hashers, shares):
                    if share:
                        hasher.jobs.put((share, done))
                yield from pieces
                done()
                for hasher in hashers:
                    if hasher.error is not None:
                        raise hasher.error
        finally:
            for hasher in hashers:
                hasher.jobs.put(None)
            for hasher in hashers:
                hasher.join()
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        for hasher in hashers:
            if hasher.error is not None:
                raise hasher.error


def stored_digests(stored: StoredFile, *, chunk_bytes: int = CHUNK_BYTES) -> dict[str, str]:
    """SHA-256 of every tensor of a safetensors file, as :func:`moeguard.models.fingerprint.tensor_digest`
    computes it for the loaded tensor (name, dtype, shape, then the bytes), read as a stream."""
    stream = TensorStream(stored, chunk_bytes=chunk_bytes)
    for _ in stream:
        pass
    return stream.digests


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are given up front: the header at once, then the data of
    each tensor in the order given, by :meth:`write` calls of any size.

    Bytes are gathered in page-aligned staging buffers that a background thread writes
    with ``O_DIRECT`` where the filesystem supports it (so writing overlaps reading and
    hashing, and nothing waits in the page cache to be flushed). :meth:`close` checks
    that every byte arrived and makes the file durable (fsync); a writer left by an
    exception removes its file.
    """

    def __init__(self, path: Path, tensors: Sequence[StoredTensor], metadata: dict[str, str] | None = None,
                 *, stage_bytes: int = CHUNK_BYTES) -> None:
        self.path = path
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_start = 8 + len(encoded)
        self.size = self.data_start + offset
        self.written = -self.data_start  # tensor bytes written so far
        self.fd, self.direct = _open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.stage_bytes = _round_up(max(1, min(stage_bytes, self.size)))
        self.free: queue.Queue = queue.Queue()
        for _ in range(WRITE_BEHIND + 1):
            self.free.put(mmap.mmap(-1, self.stage_bytes))
        self.pending: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.stage = self.free.get()
        self.filled = 0
        self.file_offset = 0
        self.thread = threading.Thread(target=self._writer, name="moeguard-write-behind", daemon=True)
        self.thread.start()
        self.write(struct.pack("<Q", len(encoded)) + encoded)

    def _writer(self) -> None:
        while (item := self.pending.get()) is not None:
            buffer, length, offset = item
            try:
                if self.error is None:
                    view = memoryview(buffer)[:length]
                    done = 0
                    while done < length:
                        done += self._pwrite(view[done:], offset + done)
                    view.release()
            except BaseException as error:  # raised by the next write or close
                self.error = error
            self.free.put(buffer)

    def _pwrite(self, view: memoryview, offset: int) -> int:
        try:
            return os.pwritev(self.fd, [view], offset)
        except OSError as error:
            if not (self.direct and error.errno == errno.EINVAL):
                raise
            os.close(self.fd)  # this filesystem refuses direct writes after all: write through the page cache
            self.fd, self.direct = os.open(self.path, os.O_WRONLY), False
            return os.pwritev(self.fd, [view], offset)

    def _flush(self, length: int) -> None:
        """Hand the staging buffer (``length`` bytes, padded to the alignment) to the writer thread."""
        if self.error is not None:
            raise self.error
        self.pending.put((self.stage, _round_up(length), self.file_offset))
        self.file_offset += self.stage_bytes
        self.stage = self.free.get()
        self.filled = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.written += len(view)
        while len(view):
            count = min(len(view), self.stage_bytes - self.filled)
            self.stage[self.filled : self.filled + count] = view[:count]
            self.filled += count
            view = view[count:]
            if self.filled == self.stage_bytes:
                self._flush(self.stage_bytes)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """The bytes of a whole tensor (contiguous, little-endian, as safetensors stores it)."""
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.write(memoryview(flat.view(torch.uint8).numpy()))

    def _stop(self) -> None:
        self.pending.put(None)
        self.thread.join()

    def close(self) -> None:
        """Finish the file (durable on return); an incomplete or failed one is removed and the error raised."""
        try:
            expected = self.size - self.data_start
            if self.written != expected:
                raise ModelError(f"{self.path}: {self.written} bytes of tensor data were written, the header "
                                 f"announces {expected}; the file is incomplete.")
            if self.filled:
                self._flush(self.filled)
            self._stop()
            if self.error is not None:
                raise self.error
            os.ftruncate(self.fd, self.size)  # the last aligned block was padded
            os.fsync(self.fd)
            if not self.direct:
                _drop_from_cache(self.fd, 0, self.size)
        except BaseException:
            self.__exit__(ModelError, None, None)
            raise
        os.close(self.fd)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
            return
        if self.thread.is_alive():
            self._stop()
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
