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

import hashlib
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterator, Sequence
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
CHUNK_BYTES = 16 << 20  # one read; a few of these are all a stream holds in memory
READ_AHEAD = 3
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
                         "the file is truncated or damaged. Copy or download it again.")
    return StoredFile(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start)


def _drop_from_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def read_ahead(path: Path, start: int, end: int, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Bytes ``start..end`` of ``path`` in consecutive chunks, read by a background thread.

    Each chunk is valid until the next one is asked for (its buffer is then reused);
    its pages are dropped from the page cache once it has been used.
    """
    chunk_bytes = max(1, min(chunk_bytes, end - start))
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
    free: queue.Queue = queue.Queue()
    filled: queue.Queue = queue.Queue()
    for _ in range(READ_AHEAD + 1):
        free.put(bytearray(chunk_bytes))
    stop = threading.Event()

    def reader() -> None:
        try:
            offset = start
            while offset < end:
                buffer = free.get()
                if stop.is_set():
                    return
                view = memoryview(buffer)[: min(chunk_bytes, end - offset)]
                done = 0
                while done < len(view):
                    count = os.preadv(fd, [view[done:]], offset + done)
                    if count == 0:
                        raise EOFError(f"{path} ends at byte {offset + done}, before byte {end}")
                    done += count
                filled.put((view, offset))
                offset += len(view)
            filled.put(None)
        except BaseException as error:  # handed to the consumer, which raises it
            filled.put(error)

    thread = threading.Thread(target=reader, name="moeguard-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = filled.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            view, offset = item
            yield view
            _drop_from_cache(fd, offset, len(view))
            free.put(view.obj)
    finally:
        stop.set()
        free.put(bytearray(0))  # wakes a reader waiting for a buffer
        thread.join()
        os.close(fd)


def stream_tensors(stored: StoredFile, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[StoredTensor, int, memoryview]]:
    """``(tensor, position in the tensor, bytes)`` pieces of every tensor of ``stored``, in data order.

    A tensor arrives in one or more consecutive pieces (an empty tensor in one empty
    piece); each piece is valid until the next one is asked for.
    """
    start = stored.data_start
    chunks = read_ahead(stored.path, start, start + stored.data_bytes, chunk_bytes=chunk_bytes) if stored.data_bytes else iter(())
    current = memoryview(b"")
    try:
        for tensor in stored.tensors:
            if tensor.nbytes == 0:
                yield tensor, 0, memoryview(b"")
                continue
            position = 0
            while position < tensor.nbytes:
                if not len(current):
                    current = next(chunks)
                piece = current[: tensor.nbytes - position]
                current = current[len(piece):]
                yield tensor, position, piece
                position += len(piece)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def stored_digests(stored: StoredFile, *, chunk_bytes: int = CHUNK_BYTES) -> dict[str, str]:
    """SHA-256 of every tensor of a safetensors file, as :func:`moeguard.models.fingerprint.tensor_digest`
    computes it for the loaded tensor (name, dtype, shape, then the bytes), read as a stream."""
    digests: dict[str, str] = {}
    digest = hashlib.sha256()
    for tensor, position, piece in stream_tensors(stored, chunk_bytes=chunk_bytes):
        if position == 0:
            digest = hashlib.sha256(digest_header(tensor.name, DTYPES[tensor.dtype], tensor.shape))
        digest.update(piece)
        if position + len(piece) == tensor.nbytes:
            digests[tensor.name] = digest.hexdigest()
    return digests


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are given up front: the header at once, then the data
    of each tensor in the order given, by :meth:`write` calls of any size. :meth:`close` checks that
    every byte arrived and makes the file durable (fsync); a writer left by an exception removes its file.
    """

    def __init__(self, path: Path, tensors: Sequence[StoredTensor], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        self.expected = offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write_all(struct.pack("<Q", len(encoded)) + encoded)
        self.data_start = 8 + len(encoded)
        self.written = 0

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            view = view[os.write(self.fd, view):]

    def write(self, data: bytes | memoryview) -> None:
        self._write_all(data)
        self.written += memoryview(data).nbytes

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """The bytes of a whole tensor (contiguous, little-endian, as safetensors stores it)."""
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.write(memoryview(flat.view(torch.uint8).numpy()))

    def close(self) -> None:
        try:
            if self.written != self.expected:
                raise ModelError(f"{self.path}: {self.written} bytes of tensor data were written, the header "
                                 f"announces {self.expected}; the file is incomplete.")
            os.fsync(self.fd)
            _drop_from_cache(self.fd, 0, self.data_start + self.written)
        finally:
            os.close(self.fd)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
            return
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
