"""``moeguard inspect``: what moeguard sees in a model."""

from __future__ import annotations

import argparse

from moeguard.cli.common import add_model_arguments, load_model, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="show a model's MoE layers, experts, routing and parameter counts")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    moe = load_model(args)
    if not args.json:
        print(moe.describe())
        print(f"fingerprint: {moe.fingerprint()}")
        return 0
    counts = moe.parameter_counts()
    print_json(
        {
            "model": moe.source,
            "model_type": moe.model_type,
            "fingerprint": moe.fingerprint(),
            "parameters": {"total": counts.total, "active_per_token": counts.active_per_token, "routed_experts": counts.routed_experts},
            "layers": [
                {
                    "index": layer.index,
                    "decoder_layer": layer.decoder_layer,
                    "path": layer.path,
                    "num_experts": layer.num_experts,
                    "top_k": layer.top_k,
                    "shared_experts": layer.shared_expert_paths,
                    "group_routing": None
                    if layer.group_routing is None
                    else {"num_groups": layer.group_routing.num_groups, "groups_per_token": layer.group_routing.groups_per_token},
                    "expert_tensors": [{"name": t.name, "expert_axis": t.dim, "role": t.role} for t in layer.expert_tensors],
                }
                for layer in moe.layers
            ],
            "expert_ids": moe.expert_ids,
        }
    )
    return 0
