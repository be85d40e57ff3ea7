"""Every evasion of the table, on carves of tiny models of every family: the function-preserving ones
are checked to preserve the function first, then the disguised carve must be called derived with its
kept experts traced exactly, in the suspect's order."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_moe

from moeguard.data import build_char_tokenizer
from moeguard.forensics import detect
from moeguard.forensics.derivatives import COMPOSED, EVASIONS, carve, evade, output_difference, random_orders
from moeguard.models.random_init import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

# Float32 weights, float64 forward pass: a function-preserving change moves logits by rounding only.
SAME_FUNCTION = 1e-5


def tokenized_moe(family: str, *, tied: bool = False):
    """A tiny model of ``family`` with the character tokenizer (vocabulary evasions need one)."""
    tokenizer = build_char_tokenizer()
    moe = tiny_moe(family, vocab=len(tokenizer), tie_word_embeddings=tied)
    moe.tokenizer = tokenizer
    return moe


def parent_for(evasion: str, family: str):
    if evasion == "untie head":
        return tokenized_moe(family, tied=True)
    if EVASIONS[evasion].kind == "vocabulary":
        return tokenized_moe(family)
    return tiny_moe(family, layers=3) if evasion == "drop layer" else tiny_moe(family)


def carved(parent, seed: int = 1):
    keep = [4] * parent.num_layers
    return carve(parent, random_orders(parent, keep, seed=seed)).model


def assert_traced(verdict, suspect):
    assert verdict.derived, verdict.summary()
    assert verdict.relation == "carved subset"
    assert [lv.order for lv in verdict.layers] == suspect.expert_ids
    assert all(lv.merged == {} for lv in verdict.layers)


CASES = [
    (name, family)
    for name in EVASIONS
    for family in FAMILIES
    if EVASIONS[name].unsupported(parent_for(name, family)) is None
]


@pytest.mark.parametrize("name,family", [case for case in CASES if EVASIONS[case[0]].exact])
def test_a_function_preserving_evasion_keeps_the_outputs_and_the_carve_is_still_traced(name, family):
    parent = parent_for(name, family)
    original = carved(parent)
    suspect = evade(original, [name], seed=7)
    assert output_difference(original, suspect) < SAME_FUNCTION
    assert_traced(detect(parent, suspect, progress=False), suspect)


@pytest.mark.parametrize("name,family", [case for case in CASES if not EVASIONS[case[0]].exact])
def test_an_approximate_evasion_does_not_hide_the_carve(name, family):
    parent = parent_for(name, family)
    original = carved(parent)
    suspect = evade(original, [name], seed=7)
    assert output_difference(original, suspect) > SAME_FUNCTION  # it really changed the model
    verdict = detect(parent, suspect, progress=False)
    assert_traced(verdict, suspect)
    if name == "drop layer":
        assert verdict.layer_alignment == "matched" and len(verdict.layers) == parent.num_layers - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_exact_evasion_composed_keeps_the_outputs_and_the_carve_is_still_traced(family):
    parent = tokenized_moe(family)
    original = carved(parent, seed=2)
    names = [n for n in (*COMPOSED, "reorder vocabulary", "extend vocabulary") if EVASIONS[n].unsupported(original) is None]
    assert len(names) >= 6
    suspect = evade(original, names, seed=3)
    assert output_difference(original, suspect) < SAME_FUNCTION
    verdict = detect(parent, suspect, progress=False)
    assert_traced(verdict, suspect)
    assert verdict.alignment["residual"] < 1e-4  # the residual spaces were mapped onto each other exactly


def test_the_verdict_says_how_the_spaces_were_aligned_and_how_well():
    parent = tiny_moe("qwen3_moe")
    padded = evade(carved(parent), ["pad residual"], seed=1)
    alignment = detect(parent, padded, progress=False).alignment
    assert alignment["kind"].startswith("wider suspect (68 vs 64")
    assert [s["name"] for s in alignment["sources"]] == ["token rows", "residual states"]
    assert alignment["residual"] < 1e-5 and alignment["agreement"] > 0.999
    assert "by orthogonal Procrustes" in alignment["description"]


def test_evasions_that_do_not_apply_say_why():
    gpt_oss = tiny_moe("gpt_oss")
    assert "activation" in EVASIONS["scale neurons"].unsupported(gpt_oss)
    assert "tokenizer" in EVASIONS["reorder vocabulary"].unsupported(gpt_oss)
    assert "not tied" in EVASIONS["untie head"].unsupported(gpt_oss)
    assert "OLMoE" in EVASIONS["pad residual"].unsupported(tiny_moe("olmoe"))
    with pytest.raises(Exception, match="does not apply to this model"):
        evade(gpt_oss, ["scale neurons"])


@pytest.mark.parametrize("merge_weight", [0.35, 0.6])
def test_merged_experts_report_the_parent_experts_they_mix(merge_weight):
    parent = tiny_moe("qwen3_moe")
    merged = carve(parent, random_orders(parent, [4, 4], seed=3), merge_weight=merge_weight, seed=2)
    suspect = evade(merged.model, ["permute neurons", "rotate residual"], seed=4)
    verdict = detect(parent, suspect, progress=False)
    # the kept expert's slot even when the removed one carries more weight: its router row is the kept one's
    assert verdict.derived and [lv.order for lv in verdict.layers] == merged.orders
    for lv, partners in zip(verdict.layers, merged.merged):
        for position, match in enumerate(lv.matches):
            kept = merged.orders[lv.suspect_layer][position]
            shares = dict(match.mixes)
            assert set(shares) == {kept, *partners[kept]}
            assert abs(shares[kept] - (1 - merge_weight)) < 0.15


def test_independent_models_stay_independent_whatever_evasion_is_applied_to_them():
    parent = tiny_moe("qwen3_moe")
    other = tiny_moe("qwen3_moe", seed=11)
    for names in ([], ["rotate residual"], [*COMPOSED]):
        verdict = detect(parent, evade(other, names, seed=5), progress=False)
        assert verdict.status == "not derived" and verdict.relation == "independent", verdict.summary()
        assert verdict.z < verdict.z_threshold - 2
        assert all(lv.kept == [] for lv in verdict.layers)
