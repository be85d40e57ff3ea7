"""capture_routing records exactly the routing the experts receive, padding excluded."""

from __future__ import annotations

import pytest
import torch

from conftest import padded_batch, tiny_moe
from moeguard.models.routing import routing_arguments


def record_experts_calls(moe):
    """Independent witness: every (index, weights) the experts modules receive, unfiltered."""
    calls = {layer.index: [] for layer in moe.layers}
    handles = []
    for layer in moe.layers:
        def hook(module, args, kwargs, layer=layer):
            _, index, weights = routing_arguments(args, kwargs)
            calls[layer.index].append((index.clone(), weights.clone()))
        handles.append(layer.experts.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def test_capture_counts_non_pad_tokens_times_top_k_and_matches_the_experts_input(family):
    moe = tiny_moe(family)
    input_ids, attention_mask = padded_batch()
    calls, handles = record_experts_calls(moe)
    with torch.no_grad(), moe.capture_routing() as capture:
        moe.model(input_ids=input_ids, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()

    non_pad = int(attention_mask.sum())
    keep_rows = attention_mask.reshape(-1).bool()
    for layer in moe.layers:
        index, weights = capture.indices(layer.index), capture.weights(layer.index)
        assert index.shape == (non_pad, layer.top_k)
        assert int(capture.counts(layer.index).sum()) == non_pad * layer.top_k
        (seen_index, seen_weights), = calls[layer.index]
        assert torch.equal(index, seen_index[keep_rows])
        assert torch.equal(weights, seen_weights[keep_rows])


def test_capture_follows_cached_generation_step_by_step():
    moe = tiny_moe("qwen3_moe")
    input_ids, attention_mask = padded_batch(batch=2, length=6)
    new_tokens = 4
    with torch.no_grad(), moe.capture_routing() as capture:
        out = moe.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, use_cache=True,
        )
    assert out.shape[1] == 6 + new_tokens
    # the last generated token is never fed back through the model
    expected = int(attention_mask.sum()) + 2 * (new_tokens - 1)
    assert capture.num_tokens(0) == expected


def test_selection_overrides_the_attention_mask():
    moe = tiny_moe("mixtral")
    input_ids, attention_mask = padded_batch()
    selection = torch.zeros_like(attention_mask, dtype=torch.bool)
    selection[:, -2:] = True
    with torch.no_grad(), moe.capture_routing() as capture:
        capture.selection = selection
        moe.model(input_ids=input_ids, attention_mask=attention_mask)
    assert capture.num_tokens(0) == 2 * input_ids.shape[0]


def test_on_route_streams_events_without_storing():
    moe = tiny_moe("olmoe")
    input_ids, attention_mask = padded_batch()
    seen = []
    with torch.no_grad(), moe.capture_routing(keep=False, on_route=seen.append) as capture:
        moe.model(input_ids=input_ids, attention_mask=attention_mask)
    assert capture.num_tokens(0) == 0
    assert [event.layer.index for event in seen] == [0, 1]
    event = seen[0]
    assert event.hidden_states.shape == (int(attention_mask.sum()), moe.config.hidden_size)
    assert event.token_positions.shape == (int(attention_mask.sum()), 2)


def test_expert_outputs_reconstruct_the_layer_output(family):
    """Sum over k of weight x expert output equals what the experts module returns."""
    moe = tiny_moe(family)
    input_ids, attention_mask = padded_batch()
    events = []
    outputs = {}
    handles = [
        layer.experts.register_forward_hook(lambda m, a, o, i=layer.index: outputs.setdefault(i, o))
        for layer in moe.layers
    ]
    with torch.no_grad(), moe.capture_routing(keep=False, on_route=events.append):
        moe.model(input_ids=input_ids)  # no padding: every row is captured
    for handle in handles:
        handle.remove()
    for event in events:
        per_expert = moe.expert_outputs(event.layer.index, event.hidden_states, event.top_k_index)
        combined = (per_expert * event.top_k_weights.unsqueeze(-1).to(per_expert.dtype)).sum(1)
        assert torch.allclose(combined, outputs[event.layer.index], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capturing_expert_outputs_leaves_the_logits_bit_for_bit_unchanged(family, dtype):
    moe = tiny_moe(family)
    moe.model.to(dtype)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        plain = moe.model(input_ids=input_ids, attention_mask=attention_mask).logits
        events = []
        with moe.capture_routing(keep=False, on_route=events.append, expert_outputs=True):
            captured = moe.model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(plain, captured)
    assert len(events) == moe.num_layers


def test_captured_expert_outputs_are_each_routed_expert_applied_alone(family):
    moe = tiny_moe(family)
    input_ids, attention_mask = padded_batch()
    events = []
    with torch.no_grad(), moe.capture_routing(keep=False, on_route=events.append, expert_outputs=True):
        moe.model(input_ids=input_ids, attention_mask=attention_mask)
    non_pad = int(attention_mask.sum())
    for event in events:
        assert event.expert_outputs.shape == (non_pad, event.layer.top_k, event.hidden_states.shape[-1])
        with torch.no_grad():
            alone = moe.expert_outputs(event.layer.index, event.hidden_states, event.top_k_index)
        assert torch.allclose(event.expert_outputs, alone, atol=1e-6, rtol=1e-5)
