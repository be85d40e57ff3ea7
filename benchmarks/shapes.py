"""What the real-shape benchmarks share: checkpoints, fresh measuring processes, cold page caches, the machine.

Every measured run happens in a fresh Python process (``run_child``) so that its peak
resident memory (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` would carry the
parent's peak across exec) belongs to that run alone. A child may run against another
source tree (``src``: e.g. ``git archive main src`` unpacked elsewhere) to measure the
code before a change beside the code after it, in the same run.

Reads are measured cold: :func:`drop_cached` asks the kernel to drop a file's pages
(``posix_fadvise(POSIX_FADV_DONTNEED)``, which works on clean pages of files not mapped
by a live process) and :func:`cached_fraction` checks, with ``mincore``, that they are gone.
The disk's own bandwidth is measured with plain sequential ``O_DIRECT`` transfers of 16 MB
blocks, two in flight (:func:`sequential_read`, :func:`sequential_write`): the fastest plain
way this machine's disk was found to move bytes (buffered writes followed by fsync were 2 to
8 times slower here).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
SOURCE = BENCHMARKS.parent / "src"
RESULTS = BENCHMARKS / "results" / "shapes"


# ---------------------------------------------------------------------------- the machine


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (these benchmarks need Linux)")


def current_rss() -> int:
    """This process's resident set size now, in bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (these benchmarks need Linux)")


def reset_peak_rss() -> None:
    """Start a new peak: VmHWM falls back to the current RSS (``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def load_average() -> float:
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch
    import transformers

    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return {"cpus": os.cpu_count(), "memory": meminfo["MemTotal"], "available_memory": meminfo["MemAvailable"],
            "load_average": os.getloadavg(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


def drop_cached(paths: Iterable[Path]) -> None:
    """Drop the pages of every file under ``paths`` from the page cache (flushing dirty ones first)."""
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: Iterable[Path]) -> float:
    """The share of the files' pages that are in the page cache (``mincore`` on a private mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    cached = total = 0
    for path in _files(paths):
        size = path.stat().st_size
        if size == 0:
            continue
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
            anchor = ctypes.c_char.from_buffer(mapped)
            status = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vector)
            del anchor
            if status != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        cached += sum(v & 1 for v in vector)
        total += pages
    return cached / total if total else 0.0


def _files(paths: Iterable[Path]) -> list[Path]:
    found = []
    for path in paths:
        path = Path(path)
        found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return found


def directory_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


def largest_file(path: Path, pattern: str = "*.safetensors") -> int:
    return max(p.stat().st_size for p in Path(path).glob(pattern))


# ---------------------------------------------------------------------------- disk bandwidth


BLOCK = 16 << 20
QUEUE_DEPTH = 2  # requests in flight: as many as the streaming prune's reader and writer keep


def _direct_io(fd: int, size: int, transfer) -> None:
    """Move ``size`` bytes in 16 MB blocks, ``QUEUE_DEPTH`` threads taking every other block, page-aligned buffers."""
    blocks = -(-size // BLOCK)

    def work(first: int) -> None:
        buffer = mmap.mmap(-1, BLOCK)
        buffer.write(os.urandom(BLOCK))
        view = memoryview(buffer)
        for block in range(first, blocks, QUEUE_DEPTH):
            transfer(fd, [view[: -(-min(BLOCK, size - block * BLOCK) // 4096) * 4096]], block * BLOCK)

    threads = [threading.Thread(target=work, args=(first,)) for first in range(QUEUE_DEPTH)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def sequential_read(paths: Sequence[Path]) -> tuple[int, float]:
    """Read the files front to back with O_DIRECT (from the disk, not the page cache); (bytes, seconds)."""
    total, start = 0, time.perf_counter()
    for path in _files(paths):
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            _direct_io(fd, size, os.preadv)
        finally:
            os.close(fd)
        total += size
    return total, time.perf_counter() - start


def sequential_write(path: Path, size: int) -> tuple[int, float]:
    """Write ``size`` bytes of incompressible data with O_DIRECT and fsync; (bytes, seconds). The file is removed."""
    size = -(-size // BLOCK) * BLOCK
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        _direct_io(fd, size, os.pwritev)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return size, seconds


# ---------------------------------------------------------------------------- children


def shape_parser(description: str, shapes: Iterable[str]) -> argparse.ArgumentParser:
    """The arguments every real-shape benchmark takes: where checkpoints go, which shapes, and its child's."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", default="/tmp/moeguard-shapes")
    parser.add_argument("--shapes", default=",".join(shapes))
    parser.add_argument("--keep-checkpoints", action="store_true", help="do not delete the checkpoints at the end")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    return parser


def run_child(script: Path, arguments: Sequence[str], *, src: Path | None = None, timeout: float = 7200,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --child ARGUMENTS`` in a fresh interpreter with ``src`` first on the path; its last stdout
    line is a JSON object, returned with the child's wall seconds."""
    environment = dict(os.environ, PYTHONPATH=str(src or SOURCE), OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, str(script), "--child", *arguments], capture_output=True, text=True,
                               env=environment, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"child {' '.join(arguments)} failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["child_seconds"] = time.perf_counter() - start
    return result


def emit(result: dict[str, Any]) -> None:
    """A child's result: its peak RSS added, printed as the last line of stdout."""
    result["peak_rss"] = peak_rss()
    print(json.dumps(result), flush=True)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------- checkpoints


def checkpoint(workdir: Path, shape: str, *, moe_layers: int, dense_layers: int = 0, small: bool = False,
               vocab: int | None = None, shard_size: str | None = None, settings: dict[str, Any] | None = None) -> Path:
    """The checkpoint directory of ``shape`` under ``workdir``, written by ``real_shapes.py`` if missing."""
    name = f"{shape}-{moe_layers}l" + (f"-{dense_layers}d" if dense_layers else "") + ("-small" if small else "") + \
        (f"-v{vocab}" if vocab else "") + (f"-s{shard_size}" if shard_size else "") + \
        "".join(f"-{key}{value}" for key, value in (settings or {}).items())
    path = workdir / name
    if not (path / "config.json").is_file():
        command = [sys.executable, str(BENCHMARKS / "real_shapes.py"), "write", shape, "--moe-layers", str(moe_layers),
                   "--dense-layers", str(dense_layers), "--out", str(path), "--overwrite"]
        command += ["--small"] if small else []
        command += ["--vocab", str(vocab)] if vocab else []
        command += ["--shard-size", shard_size] if shard_size else []
        for key, value in (settings or {}).items():
            command += ["--set", f"{key}={json.dumps(value)}"]
        started = time.perf_counter()
        subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(SOURCE)))
        print(f"  (wrote {path.name} in {time.perf_counter() - started:.0f} s)", flush=True)
    return path


def new_report(args: argparse.Namespace) -> dict[str, Any]:
    """The frame of a benchmark's JSON: the machine, the settings, and one entry per case to come."""
    return {"machine": machine(), "settings": vars(args), "cases": {}}


def case_checkpoints(args: argparse.Namespace, cases: dict[str, tuple[str, int, dict[str, Any]]]
                     ) -> Iterator[tuple[str, str, int, dict[str, Any], Path]]:
    """``(name, shape, moe_layers, settings, checkpoint)`` of every case in ``args.shapes``, each
    checkpoint written under ``args.workdir`` if missing (see :func:`checkpoint`)."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in args.shapes.split(","):
        shape, layers, settings = cases[name]
        yield name, shape, layers, settings, checkpoint(workdir, shape, moe_layers=layers, settings=settings)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def carve(source: Path, out: Path, fraction: float) -> tuple[int, int]:
    """Streaming-prune ``source`` to every ``1 / fraction``-th expert of each layer (at least top-k) into ``out``;
    returns the experts kept per layer and the experts there were."""
    from moeguard.pruning.streaming import load_meta_moe, streaming_prune

    remove(out)
    meta = load_meta_moe(source)
    layer = meta.layers[0]
    keep = max(layer.top_k, round(layer.num_experts * fraction))
    stride = layer.num_experts // keep
    streaming_prune(source, {each.index: [i * stride for i in range(keep)] for each in meta.layers}, out, progress=False)
    return keep, layer.num_experts


# ---------------------------------------------------------------------------- timing the parts of a call


class PartTimer:
    """Wraps functions of modules and adds up the seconds spent in each (by label)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, module, name: str, label: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)

    def wrap_detect(self) -> None:
        """The parts of ``moeguard.forensics.detect``: signatures, comparisons, and the assignments within them."""
        import importlib

        from moeguard.forensics import matching

        detect_module = importlib.import_module("moeguard.forensics.detect")
        self.wrap(detect_module, "layer_signature", "signatures")
        self.wrap(detect_module, "compare_layers", "comparison")
        self.wrap(matching, "match_experts", "assignment")
