"""Models spread by accelerate's device_map with weights offloaded to disk: same fingerprint, same attribution."""

from __future__ import annotations

import pytest
import torch

from conftest import padded_batch, tiny_moe
from moeguard.attribution import collect_attribution
from moeguard.errors import InputError
from moeguard.models.loading import parse_max_memory
from moeguard.models.options import LoadOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_offloaded_model_has_the_fingerprint_and_attribution_of_the_loaded_one(tmp_path):
    tiny_moe("qwen3_moe", layers=4).model.save_pretrained(tmp_path / "model")
    size = sum(p.stat().st_size for p in (tmp_path / "model").glob("*.safetensors"))
    offloaded = LoadOptions(device_map="auto", max_memory=f"cpu={size // 3}", offload_folder=str(tmp_path / "off")).load(
        tmp_path / "model")
    loaded = LoadOptions().load(tmp_path / "model")
    assert "disk" in offloaded.model.hf_device_map.values()
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())
    assert offloaded.fingerprint() == loaded.fingerprint()
    batches = []
    for seed in range(2):
        input_ids, attention_mask = padded_batch(seed=seed)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    a = collect_attribution(offloaded, batches, criteria=["reap"], progress=False)
    b = collect_attribution(loaded, batches, criteria=["reap"], progress=False)
    assert torch.equal(a.total("routed"), b.total("routed"))
    assert torch.allclose(a.total("weighted_norm"), b.total("weighted_norm"), rtol=1e-6)


def test_max_memory_is_read_per_device():
    assert parse_max_memory("cpu=8GiB, 0=20GiB,1=1000") == {"cpu": "8GiB", 0: "20GiB", 1: 1000}


@pytest.mark.parametrize("text", ["8GiB", "cpu:8GiB", "cpu=lots", "=4GB"])
def test_a_malformed_max_memory_is_refused(text):
    with pytest.raises(InputError, match="DEVICE=AMOUNT"):
        parse_max_memory(text)


def test_max_memory_without_a_device_map_is_refused(tmp_path):
    with pytest.raises(InputError, match="device_map"):
        LoadOptions(max_memory="cpu=1GiB").load(tmp_path)
