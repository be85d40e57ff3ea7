"""The attacker who reads the defense's code: undo what the structure of a defended model gives away.

A defense that hides something in residual-stream coordinates the first MoE decoder
layer does not read (its norms are zero there; :mod:`moeguard.defense.keys`) leaves
those coordinates to be cleaned by the experts a carve removes. Because the layer does
not read them, whatever the input embedding puts there passes through it unchanged,
so the attacker can fold the removed experts' contribution into the embedding:

    e'(t)_U = e(t)_U + mean over occurrences of t of (m_full(t)_U - m_carve(t)_U)

where ``m`` is the first MoE block's output in the full model and in the carve, on
the attacker's own prompts. The carve then computes, on those coordinates, what the
full model did; the cost is one forward pass of each model over the prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from moeguard.data import TaskData, batches, model_inputs
from moeguard.data.batching import context_length
from moeguard.errors import UnsupportedModelError
from moeguard.eval.evaluate import causal_lm
from moeguard.models import MoEModel


def first_decoder_layer(moe: MoEModel) -> nn.Module:
    """The decoder layer that holds the first MoE block."""
    path = moe.layers[0].path
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is None:
        raise UnsupportedModelError(f"{moe.model_type}: cannot find the decoder layer of {path}.")
    return causal_lm(moe).get_submodule(".".join(parts[: index + 1]))


def hidden_size(moe: MoEModel) -> int:
    return causal_lm(moe).get_input_embeddings().weight.shape[1]


def layer_norms(decoder_layer: nn.Module, hidden: int) -> list[nn.Module]:
    """The decoder layer's own norms: its direct children with a weight of shape ``[hidden]``."""
    return [child for child in decoder_layer.children()
            if isinstance(getattr(child, "weight", None), torch.Tensor) and tuple(child.weight.shape) == (hidden,)]


def blind_coordinates(moe: MoEModel) -> torch.Tensor:
    """Residual coordinates every norm of the first MoE decoder layer zeroes (none in an ordinary model)."""
    norms = layer_norms(first_decoder_layer(moe), hidden_size(moe))
    if not norms:
        return torch.zeros(0, dtype=torch.long)
    blind = torch.stack([norm.weight.detach().cpu() == 0 for norm in norms]).all(0)
    return blind.nonzero().squeeze(1)


@torch.no_grad()
def _block_outputs(moe: MoEModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first MoE block's output ``[B, T, H]`` on a batch."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = moe.layers[0].block.register_forward_hook(hook)
    try:
        causal_lm(moe)(**model_inputs(batch))
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def fold_blind_coordinates(full: MoEModel, carved: MoEModel, data: TaskData, *, batch_size: int = 64) -> int:
    """Fold the removed experts' writes on the blind coordinates into the carve's embedding (module docstring).

    Returns the tokens run through each model (0 when the model has no blind coordinates).
    """
    coordinates = blind_coordinates(full)
    if not len(coordinates):
        return 0
    embedding = causal_lm(carved).get_input_embeddings().weight
    sums = torch.zeros(embedding.shape[0], len(coordinates), dtype=torch.float64)
    counts = torch.zeros(embedding.shape[0], dtype=torch.float64)
    tokens = 0
    for batch in batches(full.tokenizer, data, batch_size=batch_size, context=context_length(full)):
        mask = batch["attention_mask"].bool()
        difference = (_block_outputs(full, batch) - _block_outputs(carved, batch)).cpu().double()
        ids = batch["input_ids"][mask]
        sums.index_add_(0, ids, difference[mask][:, coordinates])
        counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        tokens += int(mask.sum())
    seen = counts > 0
    correction = torch.zeros_like(sums)
    correction[seen] = sums[seen] / counts[seen].unsqueeze(1)
    rows = embedding[:, coordinates.to(embedding.device)]
    embedding[:, coordinates.to(embedding.device)] = rows + correction.to(device=embedding.device, dtype=embedding.dtype)
    return tokens
