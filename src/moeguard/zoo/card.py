"""The demo model's card: README.md for people, demo_card.json with the same numbers."""

from __future__ import annotations

from typing import Any

CARD_JSON = "demo_card.json"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def render_card(card: dict[str, Any]) -> str:
    """The model card (markdown with Hugging Face metadata) of a demo model's ``card`` record."""
    config, training, routing = card["config"], card["training"], card["routing"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moeguard, mixture-of-experts, demo]",
        "---",
        "",
        f"# moeguard demo MoE ({card['model_type']}, {config['experts']} experts, top-{config['top_k']})",
        "",
        "A stock transformers Mixture-of-Experts causal LM trained from scratch by "
        f"`moeguard zoo train` on moeguard's built-in tasks. It loads with `AutoModelForCausalLM` "
        "and `AutoTokenizer` (character-level tokenizer).",
        "",
        "## Model",
        "",
        f"- {config['layers']} decoder layers, all sparse MoE; hidden {config['hidden']}, {config['heads']} heads; "
        f"{config['experts']} experts of width {config['expert_hidden']} per layer, top-{config['top_k']} routing",
        f"- {card['parameters']['total']:,} parameters, {card['parameters']['active_per_token']:,} active per token",
        f"- weights fingerprint (SHA-256): `{card['fingerprint']}`",
        "",
        "## Data",
        "",
        f"Tasks: {', '.join(config['tasks'])} (moeguard task suite v{card['task_suite_version']}). "
        f"{config['train_examples']:,} training examples per task drawn with seed {card['seed']}"
        + "".join(f", {weight:g}x as many of {task}" for task, weight in config["task_weights"] if task in config["tasks"])
        + "; "
        "test prompts never occur in training data (splits are assigned by a hash of the prompt).",
        "",
        "## Training",
        "",
        f"- seed {card['seed']}; {training['steps']:,} steps of batch {config['batch_size']}, AdamW lr {config['lr']} "
        f"(warm-up {config['warmup']}, cosine decay), weight decay {config['weight_decay']}, "
        f"router load-balancing loss x {config['router_aux_loss_coef']}",
        f"- {training['tokens']:,} tokens seen ({training['target_tokens']:,} answer tokens); final loss {training['final_loss']:.4f}",
        f"- wall time {training['wall_seconds']:.1f} s, process CPU time {training['cpu_seconds']:.1f} s on "
        f"{training['threads']} threads ({training['machine']}); load average {training['load_average_start']:.2f} "
        f"at start, {training['load_average_end']:.2f} at end",
        f"- torch {card['versions']['torch']}, transformers {card['versions']['transformers']}, moeguard {card['versions']['moeguard']}",
        "",
        "## Test scores",
        "",
        "Generation tasks by greedy decoding, classification by the most likely choice, language modelling by the "
        "mean next-token loss (nats per character). *Best* is the best score any model can reach (for the bracket "
        "language: the loss of the process that draws the texts); *share of best* is the share of the way from no "
        "knowledge (0, or the unigram entropy of the text) to it.",
        "",
        "| task | type | metric | score | 95% CI | best | share of best | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, result in card["accuracy"].items():
        best, share = result.get("best", float("nan")), result.get("share_of_best", float("nan"))
        lines.append(f"| {task} | {result.get('kind', 'generate')} | {result['metric']} | {result['value']:.3f} | "
                     f"{result['ci_low']:.3f}-{result['ci_high']:.3f} | {best:.3f} | {share:.3f} | {result['n']} |")
    lines += [
        "",
        "## Routing specialisation",
        "",
        f"Effective number of experts per task (exp of the entropy of the routing frequencies on the test split; "
        f"{config['experts']} = uniform, {config['top_k']} = always the same experts), per MoE layer, and the mean "
        f"overlap (Jaccard index) of the top-{config['top_k']} expert sets of two different tasks.",
        "",
        "| task | " + " | ".join(f"layer {i}" for i in range(config["layers"])) + " | mean |",
        "|---|" + "---|" * (config["layers"] + 1),
    ]
    for task, values in routing["effective_experts"].items():
        lines.append(f"| {task} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {_mean(values):.2f} |")
    overlaps = routing["mean_top_k_overlap"]
    lines.append("| top-k overlap between tasks | " + " | ".join(f"{v:.2f}" for v in overlaps) + f" | {_mean(overlaps):.2f} |")
    lines.append("")
    return "\n".join(lines)
