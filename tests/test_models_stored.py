"""Safetensors streamed tensor by tensor: the digests of loaded tensors, files safetensors reads back, damage refused."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeguard.errors import ModelError
from moeguard.models import stored
from moeguard.models.fingerprint import tensor_digest
from moeguard.models.stored import SafetensorsWriter, StoredTensor, TensorStream, read_header, stored_digests


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 129, generator=generator),
        "b.empty": torch.zeros(0, 5),
        "c.bf16": torch.randn(3, 1000, generator=generator).to(torch.bfloat16),
        "d.ids": torch.arange(17, dtype=torch.int64),
        "e.scalar": torch.tensor(2.5),
        "f.mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("chunk_bytes, workers", [(4096, 1), (4096, 2), (8192, 3), (1 << 20, 2)])
def test_streamed_digests_equal_the_digests_of_the_loaded_tensors(tmp_path, chunk_bytes, workers):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    stream = TensorStream(read_header(tmp_path / "m.safetensors"), workers=workers, chunk_bytes=chunk_bytes)
    pieces: dict[str, bytearray] = {}
    for tensor, position, piece in stream:
        assert position == len(pieces.setdefault(tensor.name, bytearray()))
        pieces[tensor.name] += piece
    assert stream.digests == {name: tensor_digest(name, value) for name, value in tensors.items()}
    for name, value in tensors.items():
        assert bytes(pieces[name]) == value.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_buffered_reads_and_writes_give_the_same_bytes_as_direct_ones(tmp_path, monkeypatch):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    direct = stored_digests(read_header(tmp_path / "m.safetensors"), chunk_bytes=4096)
    monkeypatch.setattr(stored, "_open_direct", lambda path, flags, mode=0o644: (os.open(path, flags, mode), False))
    assert stored_digests(read_header(tmp_path / "m.safetensors"), chunk_bytes=4096) == direct
    header = read_header(tmp_path / "m.safetensors")
    with SafetensorsWriter(tmp_path / "copy.safetensors", header.tensors, {"format": "pt"}, stage_bytes=4096) as writer:
        for _, _, piece in TensorStream(header):
            writer.write(piece)
    assert all(torch.equal(load_file(tmp_path / "copy.safetensors")[k], v) for k, v in tensors.items())


def test_a_written_file_loads_with_safetensors_whatever_the_write_sizes(tmp_path):
    tensors = mixed_tensors()
    entries = [StoredTensor(name, stored.SAFETENSORS_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size())
               for name, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "w.safetensors", entries, {"format": "pt"}, stage_bytes=4096) as writer:
        for value in tensors.values():
            raw = value.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for start in range(0, len(raw), 333):  # pieces that straddle the staging buffers
                writer.write(raw[start:start + 333])
    loaded = load_file(tmp_path / "w.safetensors")
    assert sorted(loaded) == sorted(tensors)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
    assert (tmp_path / "w.safetensors").stat().st_size % 4096 != 0  # the padded last block was cut off


def test_an_incomplete_write_is_an_error_and_leaves_no_file(tmp_path):
    entries = [StoredTensor("x", "F32", (4,), 16)]
    with pytest.raises(ModelError, match="incomplete"):
        with SafetensorsWriter(tmp_path / "w.safetensors", entries) as writer:
            writer.write(b"\0" * 8)
    assert not (tmp_path / "w.safetensors").exists()


def write_raw(path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "does not fit its shape"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "malformed"),
])
def test_damaged_headers_are_refused_before_any_data_is_read(tmp_path, header, data, message):
    write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ModelError, match=message):
        read_header(tmp_path / "bad.safetensors")


def test_a_header_length_beyond_the_file_is_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        read_header(tmp_path / "bad.safetensors")
