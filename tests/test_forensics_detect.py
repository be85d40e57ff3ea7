"""detect(): derivatives of a parent are found with their kept sets; independent models are not;
several candidate parents are ranked; checkpoints are read one layer of experts at a time."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import padded_batch, tiny_moe

from moeguard.data import batches, build_char_tokenizer, load_task
from moeguard.errors import InputError, PlanError
from moeguard.forensics import NullCalibration, calibrate, detect, rank_parents
from moeguard.forensics.derivatives import carve, evade, random_orders, reindex_experts
from moeguard.models import MoEModel, load_moe
from moeguard.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def carved(family: str, keep: list[int], *, seed: int = 1, **overrides) -> tuple[MoEModel, list[list[int]]]:
    """A copy of the tiny parent keeping ``keep[l]`` random experts per layer, in random order."""
    parent = tiny_moe(family, **overrides)
    orders = random_orders(parent, keep, seed=seed)
    return carve(parent, orders).model, orders


def random_token_batches(vocab: int = 128, *, seed: int = 0):
    """Endless batches of random token sequences, every token labelled."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, vocab, (4, 12), generator=generator)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def fine_tune(moe: MoEModel, *, lr: float, steps: int, parameters=None) -> None:
    train(moe, random_token_batches(), steps=steps, lr=lr, parameters=parameters, progress=False)


def task_batches(moe: MoEModel, task: str, seed: int = 0):
    return batches(moe.tokenizer, load_task(task, "train", limit=400, seed=seed), batch_size=8, shuffle=True, seed=seed, epochs=None)


def assert_derived_with_order(verdict, orders):
    assert verdict.derived, verdict.summary()
    assert verdict.z >= verdict.z_threshold
    assert [lv.order for lv in verdict.layers] == orders
    assert verdict.kept_sets() == {layer: sorted(order) for layer, order in enumerate(orders)}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_a_pruned_and_reordered_copy_is_derived_and_its_experts_are_recovered_in_order(family):
    suspect, orders = carved(family, [4, 4])
    verdict = detect(tiny_moe(family), suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    assert verdict.relation == "carved subset" and verdict.closeness > 0.999


def test_any_keep_count_per_layer_is_recovered_including_all_experts_and_top_k():
    suspect, orders = carved("qwen3_moe", [8, 2], seed=4)  # non-uniform: lives in memory only
    assert suspect.num_experts == [8, 2]
    assert_derived_with_order(detect(tiny_moe("qwen3_moe"), suspect, progress=False), orders)


def test_a_copy_that_keeps_every_expert_is_same_lineage_not_a_carve():
    suspect, orders = carved("qwen3_moe", [8, 8], seed=4)
    verdict = detect(tiny_moe("qwen3_moe"), suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    assert verdict.relation == "same lineage, not a carve"


def test_reindexed_suspect_computes_what_the_masked_parent_computes():
    parent = tiny_moe("mixtral")
    suspect, orders = carved("mixtral", [5, 3], seed=2)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad(), parent.mask_experts({0: orders[0], 1: orders[1]}):
        expected = parent.model(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        actual = suspect.model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_reindexing_refuses_what_cannot_route():
    moe = tiny_moe("qwen3_moe")
    with pytest.raises(PlanError, match="fewer than top_k=2"):
        reindex_experts(moe, [[0], [0, 1]])
    with pytest.raises(PlanError, match="distinct expert indices"):
        reindex_experts(moe, [[0, 0, 1], [0, 1]])


@pytest.mark.parametrize("lr", [1e-4, 3e-3])
def test_full_fine_tuning_after_pruning_does_not_hide_the_parent(lr):
    parent = tiny_moe("qwen3_moe")
    suspect, orders = carved("qwen3_moe", [4, 3], seed=5)
    fine_tune(suspect, lr=lr, steps=40)
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    assert 1 - verdict.closeness > (0.02 if lr == 3e-3 else 1e-5)  # the fine-tune really moved the experts


def test_a_trained_model_pruned_to_top_k_and_re_aligned_on_a_task_is_derived(trained_tiny):
    parent = load_moe(trained_tiny)
    orders = random_orders(parent, [2, 2], seed=3)
    suspect = carve(parent, orders).model
    train(suspect, task_batches(suspect, "reverse"), steps=30, lr=3e-3, progress=False)
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    assert min(m.weight_similarity for lv in verdict.layers for m in lv.matches) < 0.99


def test_a_re_initialised_and_retrained_router_does_not_hide_the_experts(trained_tiny):
    parent = load_moe(trained_tiny)
    orders = random_orders(parent, [4, 4], seed=5)
    suspect = evade(carve(parent, orders).model, ["re-initialise router"], seed=1)
    routers = [p for layer in suspect.layers for p in layer.router_parameters()]
    train(suspect, task_batches(suspect, "upper"), steps=40, lr=3e-3, parameters=routers, progress=False)
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    for layer, parent_layer, order in zip(suspect.layers, parent.layers, orders):  # the router is not the parent's
        new, old = layer.router.weight.detach(), parent_layer.router.weight.detach()[order]
        assert (new - old).norm() > 0.5 * old.norm()


def test_fine_tuning_only_the_non_expert_parts_leaves_the_experts_identifiable():
    parent = tiny_moe("gpt_oss")
    suspect, orders = carved("gpt_oss", [3, 3], seed=6)
    routed = {id(p) for layer in suspect.layers for p in layer.expert_parameters() + layer.router_parameters()}
    others = [p for p in suspect.model.parameters() if id(p) not in routed]
    fine_tune(suspect, lr=3e-3, steps=10, parameters=others)
    verdict = detect(parent, suspect, progress=False)
    assert_derived_with_order(verdict, orders)
    # The experts are untouched; what moved is the norm gains folded into them and the residual map.
    assert min(m.weight_similarity for lv in verdict.layers for m in lv.matches) > 0.9


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_independently_initialised_models_of_the_same_architecture_are_not_derived(family):
    parent = tiny_moe(family)
    for seed in (11, 12, 13):
        verdict = detect(parent, tiny_moe(family, seed=seed), progress=False)
        assert verdict.status == "not derived", verdict.summary()
        assert verdict.relation == "independent" and verdict.z < verdict.z_threshold
        assert all(lv.kept == [] for lv in verdict.layers)


def test_an_unrelated_moe_with_other_expert_shapes_is_not_derived():
    verdict = detect(tiny_moe("qwen3_moe"), tiny_moe("olmoe", seed=21, intermediate=48, experts=6), progress=False)
    assert verdict.status == "not derived"


def test_a_model_of_another_width_is_compared_through_the_residual_map():
    verdict = detect(tiny_moe("qwen3_moe"), tiny_moe("qwen3_moe", hidden=96, seed=5), progress=False)
    assert verdict.status == "not derived"
    assert verdict.alignment["kind"].startswith("wider suspect (96 vs 64")
    assert verdict.alignment["residual"] > 0.5  # unrelated spaces: the best map explains little


def test_models_that_share_no_token_and_no_width_are_not_comparable():
    parent = tiny_moe("qwen3_moe", vocab=99)
    parent.tokenizer = build_char_tokenizer()
    stranger = tiny_moe("qwen3_moe", hidden=96, vocab=99)
    stranger.tokenizer = build_char_tokenizer(alphabet="ĀāĂăĄąĆćĈĉĊċČčĎďĐđĒēĔĕĖėĘęĚěĜĝĞğĠġĢģĤĥĦħĨĩĪīĬĭĮįİıĲĳĴĵĶķĸĹĺĻļĽľĿŀŁłŃńŅņŇňŉŊŋŌōŎŏŐőŒœŔŕŖŗŘřŚśŜŝŞşŠšŢţŤťŦŧŨũŪū")
    verdict = detect(parent, stranger, progress=False)
    assert verdict.status == "not comparable" and not verdict.derived and verdict.z is None
    assert "share no tokens" in verdict.reason  # only the 4 special tokens are common
    assert all(lv.status == "not comparable" for lv in verdict.layers)


def test_a_suspect_with_fewer_moe_layers_is_aligned_to_the_right_parent_layers():
    parent = tiny_moe("qwen3_moe", layers=3)
    suspect = copy.deepcopy(parent)
    del suspect.model.model.layers[1]
    suspect.model.config.num_hidden_layers = 2
    suspect = MoEModel.from_model(suspect.model)
    orders = random_orders(suspect, [4, 4], seed=9)
    reindex_experts(suspect, orders)
    verdict = detect(parent, suspect, progress=False)
    assert verdict.derived and verdict.layer_alignment == "matched"
    assert [lv.parent_layer for lv in verdict.layers] == [0, 2]
    assert [lv.order for lv in verdict.layers] == orders
    assert verdict.relation == "carved subset"  # a whole layer of experts is gone


def test_a_parent_with_fewer_layers_leaves_the_extra_suspect_layer_unaligned():
    parent = tiny_moe("qwen3_moe", layers=3)
    short = copy.deepcopy(parent)
    del short.model.model.layers[0]
    short.model.config.num_hidden_layers = 2
    verdict = detect(MoEModel.from_model(short.model), parent, progress=False)
    assert verdict.derived
    assert [lv.status for lv in verdict.layers] == ["unaligned", "compared", "compared"]
    assert [lv.parent_layer for lv in verdict.layers] == [None, 0, 1]


def test_detect_refuses_bad_settings_with_clear_messages():
    moe = tiny_moe("qwen3_moe")
    with pytest.raises(InputError, match="`alpha` must be a probability"):
        detect(moe, moe, alpha=2.0)
    with pytest.raises(InputError, match="`probes` must be at least 8"):
        detect(moe, moe, probes=2)
    with pytest.raises(InputError, match="MoEModel or a model directory"):
        detect(moe, 42)
    with pytest.raises(InputError, match="either reference models or a saved calibration"):
        detect(moe, moe, references=[moe], calibration=NullCalibration("reference", [0.0, 1.0, 2.0]))


def test_suspect_experts_beyond_the_parents_count_stay_unmatched():
    pruned, orders = carved("qwen3_moe", [3, 3], seed=10)
    verdict = detect(pruned, tiny_moe("qwen3_moe"), progress=False)  # the larger model as the suspect
    assert verdict.derived
    for lv, order in zip(verdict.layers, orders):
        assert sum(m.candidate is None for m in lv.matches) == 5
        assert {s: m.parent_expert for s, m in enumerate(lv.matches) if m.parent_expert is not None} == {
            expert: position for position, expert in enumerate(order)
        }


def test_reference_models_calibrate_the_verdict_and_the_calibration_is_saved_and_checked(tmp_path):
    parent = tiny_moe("qwen3_moe")
    references = [tiny_moe("qwen3_moe", seed=s) for s in (31, 32, 33, 34)]
    calibration = calibrate(parent, references, progress=False)
    assert calibration.kind == "reference" and calibration.count == 4
    assert calibration.parent_fingerprint == parent.fingerprint()
    calibration.save(tmp_path / "calibration.json")
    loaded = NullCalibration.load(tmp_path / "calibration.json")
    assert loaded.statistics == pytest.approx(calibration.statistics)
    suspect, orders = carved("qwen3_moe", [4, 4], seed=3)
    verdict = detect(parent, suspect, calibration=loaded, progress=False)
    assert_derived_with_order(verdict, orders)
    assert verdict.calibration["kind"] == "reference" and verdict.calibration["count"] == 4
    assert verdict.z_threshold > 30  # Student-t with 3 degrees of freedom at 1e-6: a wide margin for a small set
    independent = detect(parent, tiny_moe("qwen3_moe", seed=35), references=references, progress=False)
    assert independent.status == "not derived"
    with pytest.raises(InputError, match="against another parent"):
        detect(tiny_moe("qwen3_moe", seed=36), suspect, calibration=loaded, progress=False)


def test_a_calibration_file_is_validated_on_read(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text('{"format": "moeguard-detect-calibration/1", "kind": "reference", "statistics": [1, "x"], '
                    '"references": [], "settings": {}}')
    with pytest.raises(InputError, match="'statistics' must be a list of finite numbers"):
        NullCalibration.load(path)
    path.write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not a moeguard detect calibration"):
        NullCalibration.load(path)
    with pytest.raises(InputError, match="at least 3 reference models"):
        NullCalibration("reference", [1.0, 2.0])


def test_a_checkpoint_is_read_one_layer_of_experts_at_a_time_with_the_same_verdict(tmp_path, monkeypatch):
    parent = tiny_moe("qwen3_moe")
    suspect, orders = carved("qwen3_moe", [4, 4], seed=2)
    suspect = evade(suspect, ["rotate residual", "permute neurons"], seed=1)
    parent.save(tmp_path / "parent")
    suspect.model.to(torch.bfloat16)
    suspect.save(tmp_path / "suspect")
    in_memory = detect(load_moe(tmp_path / "parent"), load_moe(tmp_path / "suspect"), progress=False)

    detect_module = sys.modules["moeguard.forensics.detect"]
    original = detect_module.expert_responses
    materialised = []

    def counting(moe, layer, inputs):
        loaded = [l.index for l in moe.layers if l.expert_parameters()[0].device.type != "meta"]
        materialised.append(loaded)
        return original(moe, layer, inputs)

    monkeypatch.setattr(detect_module, "expert_responses", counting)
    lazy = detect(tmp_path / "parent", tmp_path / "suspect", progress=False)
    assert_derived_with_order(lazy, orders)
    assert lazy.z == pytest.approx(in_memory.z, rel=1e-6)
    assert lazy.suspect["dtype"] == "bfloat16"
    assert len(materialised) >= 4 and all(len(loaded) == 1 for loaded in materialised)


def test_several_candidate_parents_are_ranked_and_siblings_are_same_lineage(trained_tiny):
    base = load_moe(trained_tiny)
    sibling, other = copy.deepcopy(base), copy.deepcopy(base)
    train(sibling, task_batches(sibling, "caesar", seed=1), steps=60, lr=3e-3, progress=False)
    train(other, task_batches(other, "sort", seed=2), steps=60, lr=3e-3, progress=False)
    orders = random_orders(other, [2, 2], seed=6)
    suspect = evade(carve(other, orders).model, ["rotate residual"], seed=2)

    ranking = rank_parents([sibling, other, tiny_moe("qwen3_moe", vocab=99)], suspect, progress=False)
    assert ranking.ranking[0] == 1 and ranking.best is ranking.verdicts[1]
    assert ranking.best.relation == "carved subset" and [lv.order for lv in ranking.best.layers] == orders
    assert ranking.verdicts[0].derived and ranking.verdicts[0].relation == "same lineage, not a carve"
    assert ranking.verdicts[0].closeness < ranking.best.closeness
    assert ranking.verdicts[2].relation == "independent"

    uncarved = detect(sibling, other, progress=False)  # two fine-tunes of one base
    assert uncarved.derived and uncarved.relation == "same lineage, not a carve"


def test_a_large_vocabulary_aligns_the_residual_space_on_a_sample_of_its_token_rows(monkeypatch):
    # A release's 150k-token vocabulary is sampled; a tiny one is made "large" by lowering the cap.
    import moeguard.forensics.alignment as alignment

    monkeypatch.setattr(alignment, "MAX_TOKEN_ROWS", 64)
    sample = alignment.token_row_sample(128, seed=0)
    assert len(sample) == 64 and bool((sample[1:] > sample[:-1]).all())
    assert torch.equal(sample, alignment.token_row_sample(128, seed=0))
    carve_of_parent, orders = carved("qwen3_moe", [4, 4])
    suspect = evade(carve_of_parent, ["rotate residual", "permute residual"], seed=5)
    assert_derived_with_order(detect(tiny_moe("qwen3_moe"), suspect, progress=False), orders)
