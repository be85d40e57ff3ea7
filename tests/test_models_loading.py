"""Loading a local checkpoint reads its safetensors into memory the model owns: same model, no file pages kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import padded_batch, tiny_moe
from moeguard.models.loading import load_moe
from moeguard.models.random_init import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


def save_sharded(family: str, out: Path, dtype: torch.dtype) -> Path:
    model = tiny_moe(family).model.to(dtype)
    model.save_pretrained(out, max_shard_size="200KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_read_checkpoint_is_bit_identical_to_transformers_memory_mapped_load(tmp_path, family, dtype):
    from transformers import AutoModelForCausalLM

    path = save_sharded(family, tmp_path / "model", dtype)
    mapped = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    read = load_moe(path, dtype="auto", with_tokenizer=False).model
    expected, got = mapped.state_dict(), read.state_dict()
    assert got.keys() == expected.keys()
    assert read.lm_head.weight.dtype == dtype
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(read(input_ids=input_ids, attention_mask=attention_mask).logits,
                           mapped(input_ids=input_ids, attention_mask=attention_mask).logits)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_a_loaded_model_keeps_no_checkpoint_file_mapped(tmp_path):
    path = save_sharded("qwen3_moe", tmp_path / "model", torch.bfloat16)
    moe = load_moe(path, with_tokenizer=False)
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path.resolve()) in line]
    assert mapped == []
    assert sum(p.numel() for p in moe.model.parameters()) > 0


def test_loading_leaves_transformers_reading_files_its_own_way(tmp_path):
    from safetensors import safe_open
    from transformers import modeling_utils

    before = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    load_moe(save_sharded("mixtral", tmp_path / "model", torch.float32), with_tokenizer=False)
    assert modeling_utils.safe_open is safe_open
    assert os.environ.get("HF_DEACTIVATE_ASYNC_LOAD") == before
