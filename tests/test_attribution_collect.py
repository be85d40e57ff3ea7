"""Collecting an attribution from a model: the statistics are those of the routing the model used."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import padded_batch, tiny_moe
from moeguard.attribution import CRITERIA, collect_attribution, scores
from moeguard.attribution.statistics import coactivation_counts
from moeguard.attribution.summary import overlap
from moeguard.errors import DataError, InputError
from moeguard.models import MoEModel, routing
from moeguard.models.routing import pair_outputs
from moeguard.models.surgery import prune_in_place
from moeguard.training import lm_loss
from moeguard.zoo import TINY_DEMO

# Tiny models gain nothing from a second thread, and on a busy machine two threads stall each other.
pytestmark = pytest.mark.usefixtures("one_thread")

ROUTING_CRITERIA = ("frequency", "gate_mass", "reap", "ean")


def batch(seed=0, **kwargs):
    input_ids, attention_mask = padded_batch(seed=seed, **kwargs)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_collected_counts_and_gate_mass_equal_those_of_the_captured_routing(family):
    moe = tiny_moe(family)
    batches = [batch(0), batch(1)]
    attribution = collect_attribution(moe, batches, criteria=["frequency"], progress=False)
    with torch.no_grad(), moe.capture_routing() as capture:
        for b in batches:
            moe.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    non_pad = sum(int(b["attention_mask"].sum()) for b in batches)
    assert attribution.token_counts == [non_pad] * moe.num_layers
    assert attribution.samples == 6
    for layer in range(moe.num_layers):
        index, weights = capture.indices(layer), capture.weights(layer)
        assert torch.equal(attribution.total("routed")[layer], capture.counts(layer))
        expected_gate = torch.zeros(moe.num_experts[layer], dtype=torch.float64).index_add_(
            0, index.reshape(-1), weights.reshape(-1).double()
        )
        assert torch.allclose(attribution.total("gate_mass")[layer], expected_gate)
        assert torch.equal(attribution.coactivation[layer], coactivation_counts(index, moe.num_experts[layer]))
    assert torch.allclose(scores(attribution, "frequency").sum(1), torch.ones(moe.num_layers, dtype=torch.float64))


def mixtral_expert_output(experts, expert, x):
    """Expert ``expert``'s output on tokens ``x``, straight from the fused weights (Mixtral layout)."""
    gate, up = (x @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
    return (experts.act_fn(gate) * up) @ experts.down_proj[expert].T


def test_reap_and_ean_equal_their_formulas_against_a_dense_reference():
    moe = tiny_moe("mixtral")
    b = batch(2)
    attribution = collect_attribution(moe, [b], criteria=["reap", "ean"], progress=False)
    events = []
    with torch.no_grad(), moe.capture_routing(keep=False, on_route=events.append):
        moe.model(**b)
    for event in events:
        layer = event.layer
        weighted = torch.zeros(layer.num_experts, dtype=torch.float64)
        plain = torch.zeros(layer.num_experts, dtype=torch.float64)
        with torch.no_grad():
            dense = torch.stack([mixtral_expert_output(layer.experts, e, event.hidden_states) for e in range(layer.num_experts)], 1)
        for t in range(event.top_k_index.shape[0]):
            for slot in range(layer.top_k):
                e = int(event.top_k_index[t, slot])
                norm = dense[t, e].norm().double()
                weighted[e] += event.top_k_weights[t, slot].double() * norm
                plain[e] += norm
        routed = attribution.total("routed")[layer.index].double()
        expected_reap = torch.where(routed > 0, weighted / routed.clamp_min(1), 0)
        expected_ean = torch.where(routed > 0, plain / routed.clamp_min(1), 0)
        assert torch.allclose(scores(attribution, "reap")[layer.index], expected_reap, rtol=1e-4)
        assert torch.allclose(scores(attribution, "ean")[layer.index], expected_ean, rtol=1e-4)


def experts_calls(moe):
    """The number of rows of every call of every experts module (a hook registered before any capture)."""
    rows = []
    handles = [layer.experts.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
               for layer in moe.layers]
    return rows, handles


def test_reap_runs_the_experts_once_per_layer_and_batch():
    moe = tiny_moe("qwen3_moe")
    b = batch(0)
    rows, handles = experts_calls(moe)
    collect_attribution(moe, [b], criteria=["reap"], progress=False)
    for handle in handles:
        handle.remove()
    assert rows == [b["input_ids"].numel()] * moe.num_layers  # the ordinary call only: no second pass


def test_reap_with_eager_experts_computes_expert_outputs_for_routed_tokens_only(monkeypatch):
    moe = tiny_moe("qwen3_moe")
    moe.model.set_experts_implementation("eager")  # a per-expert loop: its output cannot be formed from pairs
    b = batch(0)
    second_pass = []

    def spy(layer, hidden_states, top_k_index):
        second_pass.append(tuple(top_k_index.shape))
        return pair_outputs(layer, hidden_states, top_k_index)

    monkeypatch.setattr(routing, "pair_outputs", spy)
    eager = collect_attribution(moe, [b], criteria=["reap"], progress=False)
    monkeypatch.undo()
    non_pad = int(b["attention_mask"].sum())
    assert second_pass == [(non_pad, moe.top_k[0])] * moe.num_layers
    moe.model.set_experts_implementation("grouped_mm")
    one_pass = collect_attribution(moe, [b], criteria=["reap"], progress=False)
    assert torch.allclose(eager.total("weighted_norm"), one_pass.total("weighted_norm"), rtol=1e-5)


# ---------------------------------------------------------------- steered routers
def steer(moe: MoEModel, task_a: list[int], task_b: list[int]) -> None:
    """Send every token of task A (ids 3..63) to experts ``task_a`` and of task B (ids 64..) to ``task_b``.

    Embedding dimension 0 is +5 for task A tokens and -5 for task B tokens and
    dominates the normalised hidden state; each router reads only that dimension.
    The other experts stay close behind a task's experts (router row 0.3 against
    0.4), so a masked expert's tokens go to one of them with a real share of weight.
    """
    with torch.no_grad():
        embeddings = moe.model.get_input_embeddings().weight
        embeddings[3:64, 0] = 5.0
        embeddings[64:, 0] = -5.0
        for layer in moe.layers:
            for ref in layer.tensors("router"):
                ref.get().zero_()
            weight = layer.router.weight
            weight[:, 0] = 0.3
            for rank, expert in enumerate(task_a):
                weight[expert, 0] = 0.4 - 0.01 * rank
            for rank, expert in enumerate(task_b):
                weight[expert, 0] = -(0.4 - 0.01 * rank)


def task_batches(low: int, high: int, *, seed: int, answer_token: int | None = None) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(low, high, (4, 12), generator=generator)
    b = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "example_index": torch.arange(4)}
    if answer_token is not None:
        labels = torch.full_like(input_ids, answer_token)
        labels[:, 0] = -100
        b["labels"] = labels
    return [b]


def targets(moe: MoEModel) -> tuple[list[int], list[int]]:
    k = moe.top_k[0]
    return [5, 2, 4, 1][:k], [0, 7, 3, 6][:k]


def test_routing_criteria_rank_the_experts_a_task_is_sent_to_first(family):
    moe = tiny_moe(family)
    task_a, task_b = targets(moe)
    steer(moe, task_a, task_b)
    a = collect_attribution(moe, task_batches(3, 64, seed=0), criteria=ROUTING_CRITERIA, task="a", progress=False)
    b = collect_attribution(moe, task_batches(64, 128, seed=1), criteria=ROUTING_CRITERIA, task="b", progress=False)
    k = len(task_a)
    for criterion in ROUTING_CRITERIA:
        for attribution, wanted in ((a, task_a), (b, task_b)):
            s = scores(attribution, criterion)
            for layer in range(moe.num_layers):
                assert set(s[layer].topk(k).indices.tolist()) == set(wanted), (criterion, attribution.task, layer)
    jaccard = overlap([a, b], "frequency", top_m=k)
    assert torch.equal(jaccard[0, 1], torch.zeros(moe.num_layers, dtype=torch.float64))
    assert torch.equal(jaccard[0, 0], torch.ones(moe.num_layers, dtype=torch.float64))


def make_experts_write_the_answer(moe: MoEModel, experts: list[int], answer_token: int) -> None:
    """Experts ``experts`` output a positive multiple of hidden direction 1, which the LM head reads as the answer.

    With gate and up rows equal, ``silu(g) * g >= 0``, so the output's sign does not
    depend on the token (Mixtral-layout fused experts).
    """
    with torch.no_grad():
        for layer in moe.layers:
            gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
            inner = down.shape[-1]
            for expert in experts:
                reader = torch.zeros(gate_up.shape[-1])
                reader[0] = 0.3
                gate_up[expert] = reader.expand(2 * inner, -1)
                down[expert].zero_()
                down[expert, 1] = 0.01
        head = moe.model.lm_head.weight
        head[:, 0] = 0  # the routing dimension says nothing about the answer
        head[answer_token, 1] = 2.0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_ablation_ranks_the_experts_a_task_needs_first(family):
    moe = tiny_moe(family)
    task_a, task_b = targets(moe)
    steer(moe, task_a, task_b)
    make_experts_write_the_answer(moe, task_a, answer_token=10)
    batches = task_batches(3, 64, seed=0, answer_token=10)
    a = collect_attribution(moe, batches, criteria=CRITERIA, progress=False)
    # The unmasked loss is the training loss of the same batch.
    with torch.no_grad():
        assert a.total("base_loss").item() / a.total("loss_tokens").item() == pytest.approx(lm_loss(moe, batches[0]).item(), rel=1e-5)
    knowledge_loss = scores(a, "ablation")
    for layer in range(moe.num_layers):
        assert set(knowledge_loss[layer].topk(len(task_a)).indices.tolist()) == set(task_a)
        assert (knowledge_loss[layer, task_a] > 1e-3).all()
        others = [e for e in range(moe.num_experts[layer]) if e not in task_a]
        # Experts no token reaches: masking them changes nothing (up to float rounding).
        assert knowledge_loss[layer, others].abs().max() < 1e-6
    for criterion in ROUTING_CRITERIA:
        assert set(scores(a, criterion)[0].topk(len(task_a)).indices.tolist()) == set(task_a)


def test_ablation_sees_the_softmax_renormalisation_of_routers_over_all_experts():
    """Masking an expert no token reaches changes nothing under top-k renormalisation (Mixtral),
    but raises the others' weights where the softmax runs over every expert (OLMoE), as pruning would."""
    unused = {}
    for family in ("mixtral", "olmoe"):
        moe = tiny_moe(family)
        task_a, task_b = targets(moe)
        steer(moe, task_a, task_b)
        a = collect_attribution(moe, task_batches(3, 64, seed=0, answer_token=10), criteria=["ablation"], progress=False)
        neutral = [e for e in range(8) if e not in task_a + task_b]
        unused[family] = scores(a, "ablation")[:, neutral].abs().max().item()
    assert unused["mixtral"] < 1e-7
    assert unused["olmoe"] > 1e-6


# ---------------------------------------------------------------- token selection
def test_prompt_and_answer_tokens_split_the_routing():
    moe = tiny_moe("olmoe")
    b = batch(0)
    prompt = torch.zeros_like(b["attention_mask"], dtype=torch.bool)
    prompt[:, :7] = True
    b["prompt_mask"] = prompt & b["attention_mask"].bool()
    b["answer_mask"] = ~prompt & b["attention_mask"].bool()
    parts = {
        tokens: collect_attribution(moe, [b], tokens=tokens, criteria=["frequency"], progress=False)
        for tokens in ("all", "prompt", "answer")
    }
    assert parts["prompt"].token_counts[0] == int(b["prompt_mask"].sum())
    assert parts["answer"].token_counts[0] == int(b["answer_mask"].sum()) == 3 * 3
    assert torch.equal(parts["prompt"].total("routed") + parts["answer"].total("routed"), parts["all"].total("routed"))


def test_non_uniform_expert_counts_are_padded_end_to_end(tmp_path):
    """A model whose second MoE layer kept 6 of 8 experts: its scores are 8 wide, padding -inf."""
    moe = tiny_moe("mixtral")
    prune_in_place(moe.model, moe.layers, [None, [0, 1, 2, 3, 4, 5]])
    moe = MoEModel.from_model(moe.model)
    assert moe.num_experts == [8, 6]
    attribution = collect_attribution(moe, [batch(0)], criteria=ROUTING_CRITERIA, progress=False)
    s = scores(attribution, "frequency")
    assert s.shape == (2, 8) and torch.isinf(s[1, 6:]).all()
    assert s[1, :6].sum().item() == pytest.approx(1.0)
    attribution.save(tmp_path / "a.json")
    from moeguard.attribution import Attribution

    loaded = Attribution.load(tmp_path / "a.json")
    assert loaded.num_experts == [8, 6] and torch.equal(scores(loaded, "reap"), scores(attribution, "reap"))


# ---------------------------------------------------------------- resume
class Interrupted(Exception):
    pass


def interrupt_after(batches, count):
    for position, b in enumerate(batches):
        if position == count:
            raise Interrupted
        yield b


def test_an_interrupted_collection_resumes_where_it_stopped(tmp_path):
    moe = tiny_moe("mixtral")
    batches = [batch(seed) for seed in range(3)]
    whole = collect_attribution(moe, batches, criteria=CRITERIA, progress=False)
    checkpoint = tmp_path / "partial"
    with pytest.raises(Interrupted):
        collect_attribution(moe, interrupt_after(batches, 2), criteria=CRITERIA, checkpoint=checkpoint,
                            checkpoint_seconds=0, progress=False)
    assert checkpoint.is_dir()
    seen = []
    resumed = collect_attribution(moe, (seen.append(b) or b for b in batches), criteria=CRITERIA,
                                  checkpoint=checkpoint, checkpoint_seconds=0, progress=False)
    assert len(seen) == 3 and resumed.batches == 3
    for name, value in whole.sums.items():
        assert torch.allclose(resumed.sums[name], value), name
    assert torch.equal(resumed.coactivation, whole.coactivation)
    assert not checkpoint.exists()
    with pytest.raises(Interrupted):
        collect_attribution(moe, interrupt_after(batches, 1), tokens="all", criteria=["frequency"],
                            checkpoint=checkpoint, checkpoint_seconds=0, progress=False)
    with pytest.raises(InputError, match="other settings.*delete it"):
        collect_attribution(moe, batches, criteria=CRITERIA, checkpoint=checkpoint, progress=False)


# ---------------------------------------------------------------- errors
def test_empty_data_is_a_clear_error():
    with pytest.raises(DataError, match="the data is empty"):
        collect_attribution(tiny_moe("mixtral"), [], progress=False)


def test_zero_selected_tokens_is_a_clear_error():
    b = batch(0)
    b["answer_mask"] = torch.zeros_like(b["attention_mask"], dtype=torch.bool)
    with pytest.raises(InputError, match=r"no tokens were selected \(tokens='answer'\).*use tokens='all'"):
        collect_attribution(tiny_moe("mixtral"), [b], tokens="answer", progress=False)


def test_prompt_tokens_need_a_prompt_mask():
    with pytest.raises(InputError, match="tokens='prompt' needs batches with a prompt_mask"):
        collect_attribution(tiny_moe("mixtral"), [batch(0)], tokens="prompt", progress=False)


def test_unknown_criterion_and_token_mode_are_refused_before_any_work():
    moe = tiny_moe("mixtral")
    with pytest.raises(InputError, match="unknown attribution criterion 'rep'"):
        collect_attribution(moe, [batch(0)], criteria=["rep"], progress=False)
    with pytest.raises(InputError, match="tokens must be one of all, prompt, answer"):
        collect_attribution(moe, [batch(0)], tokens="answers", progress=False)


def test_ablation_is_refused_where_one_expert_cannot_be_masked_alone():
    # Group-limited routing needs equal kept counts per group: one expert cannot be masked alone.
    with pytest.raises(InputError, match="ablation masks one expert at a time, which layer 0 cannot route around"):
        collect_attribution(tiny_moe("deepseek_v3"), [batch(0)], criteria=["ablation"], progress=False)


# ---------------------------------------------------------------- a trained model
def test_on_a_trained_model_tasks_use_few_stable_distinct_experts_that_they_need(trained_tiny, one_thread):
    """The tiny demo model, trained on four tasks: each task routes its answers to clearly fewer
    experts than all 8, the same ones in both halves of its samples; some two tasks use different
    experts; and masking one of a task's most used experts costs more loss than masking a least
    used one.

    Which tasks end up on separate experts depends on the training run (another CPU trains other
    weights): the need for experts is measured on the two tasks whose answers overlap least. The
    loss of masking an expert is compared with how often all tokens use it: an expert the answers
    never use can still carry the prompt, which the answer is computed from. Measured over four
    training runs: effective experts 3.2-6.4, stability 0.79-1.0, least overlap 0.0-0.17, mean
    loss of masking a most used expert 0.02-0.9 nats."""
    from moeguard.attribution import attribute, specialisation
    from moeguard.data import load_task
    from moeguard.models import load_moe

    moe = load_moe(trained_tiny)
    tasks = list(TINY_DEMO.tasks)
    answers = [attribute(moe, load_task(task, "train", limit=96), tokens="answer", criteria=["frequency"],
                         batch_size=16, progress=False).attribution for task in tasks]
    for task, a in zip(tasks, answers):
        summary = specialisation(a, ["frequency"])
        assert max(summary.effective_experts) < 0.85 * 8, task  # uniform routing gives 8
        assert min(summary.stability["frequency"]) > 0.7, task
    pairs = overlap(answers, "frequency", top_m=2).mean(-1)
    apart = min(itertools.combinations(range(len(tasks)), 2), key=lambda pair: float(pairs[pair]))
    assert pairs[apart] < 0.5, pairs
    for task in (tasks[i] for i in apart):
        a = attribute(moe, load_task(task, "train", limit=48), tokens="all", criteria=["frequency", "ablation"],
                      batch_size=16, progress=False).attribution
        frequency, knowledge_loss = scores(a, "frequency"), scores(a, "ablation")
        most = [knowledge_loss[layer, frequency[layer].topk(2).indices].mean() for layer in range(moe.num_layers)]
        least = [knowledge_loss[layer, frequency[layer].topk(2, largest=False).indices].mean() for layer in range(moe.num_layers)]
        assert all(m > n for m, n in zip(most, least)), (task, most, least)
        assert sum(most) / len(most) > 5e-3, (task, most)
