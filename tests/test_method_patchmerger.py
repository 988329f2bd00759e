"""PatchMerger against a naive re-implementation of its spec (learned LayerNorm, K random queries,
softmax over the tokens at scale 1 or C^-0.5, mixtures of the LayerNormed tokens), plus its bookkeeping,
gradients, saving, MACs and errors."""

import pytest
import torch

import tokendrop as td
from naive_blocks import deit_tiny, images, small_vit
from naive_soft_merge import check_records, check_save_and_load, check_train_only_and_learns, layer_norm, naive_model
from tokendrop.bench.flops import attached_macs, count_macs
from tokendrop.methods import PatchMerger


def patchmerger_factory(seed=0, **kwargs):
    """Per site: a PatchMerger with seeded ``randn`` queries and a LayerNorm other than the identity."""

    def build(facts):
        red = td.reducer("patchmerger", **kwargs)(facts)
        gen = torch.Generator().manual_seed(1000 * seed + facts.block)
        with torch.no_grad():
            red.queries.normal_(0.0, 1.0, generator=gen)
            red.norm.weight.normal_(1.0, 0.1, generator=gen)
            red.norm.bias.normal_(0.0, 0.1, generator=gen)
        return red

    return build


def naive_patchmerger(red, keep, scale):
    """The spec's merge of one image ``z`` (N, C) with ``red``'s parameters copied out, in float64: query
    ``k`` weighs token ``i`` by ``softmax_i(q_k · y_i · scale)``, ``y = LN(z)``."""
    g, b, q = (p.detach().double().clone() for p in (red.norm.weight, red.norm.bias, red.queries))

    def merge(z):
        y = layer_norm(z.double(), g, b)
        logits = q[:keep] @ y.T * scale  # [k, i] = q_k · y_i
        e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        a = e / e.sum(dim=1, keepdim=True)
        return a @ y, a.T

    return merge


def naive_merges(model, keeps, scale):
    return {s.block: naive_patchmerger(s.reducer, k, scale) for s, k in zip(td.sites(model), keeps)}


@pytest.mark.parametrize("scaled", [False, True])
def test_patchmerger_protocol_matches_naive(scaled):
    model = deit_tiny()
    x = images()
    td.attach(model, patchmerger_factory(scaled_attention=scaled), blocks=[3, 6, 9], schedule=td.Constant(0.7),
              when="always", relative_to="original")
    assert td.expected_patch_tokens(model) == [137, 96, 67]
    with torch.no_grad():
        out = model(x)
    scale, other = (192 ** -0.5, 1.0) if scaled else (1.0, 192 ** -0.5)
    ref, ref_sites = naive_model(model, x, naive_merges(model, [137, 96, 67], scale))
    check_records(td.last_reduction(model).records, ref_sites, [137, 96, 67])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the comparison can fail: the other attention scale gives other logits
    wrong, _ = naive_model(model, x, naive_merges(model, [137, 96, 67], other))
    assert (out - wrong).abs().max() > 1e-3


def test_patchmerger_curriculum_uses_the_first_queries():
    model = small_vit(depth=4)
    x = images(32)
    td.attach(model, patchmerger_factory(), blocks=[1, 3], schedule=td.Linear(0, 10, final=0.5), when="always")
    assert [s.reducer.queries.shape[0] for s in td.sites(model)] == [64, 64]
    td.set_epoch(model, 10)
    with torch.no_grad():
        out = model(x)
    ref, ref_sites = naive_model(model, x, naive_merges(model, [32, 16], 1.0))
    check_records(td.last_reduction(model).records, ref_sites, [32, 16])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_patchmerger_train_only_leaves_evaluation_identical_and_learns():
    check_train_only_and_learns("patchmerger", ("queries", "norm.weight", "norm.bias"))


def test_patchmerger_parameters_save_and_load():
    check_save_and_load(patchmerger_factory, "queries", (16, 48))


def test_patchmerger_init_defaults_and_macs():
    torch.manual_seed(0)
    red = PatchMerger(dim=192, keep=137)
    assert red.default_position == "before" and not red.prop_attn and not red.scaled_attention
    assert red.attn_scale == 1.0 and PatchMerger(dim=192, keep=4, scaled_attention=True).attn_scale == 192 ** -0.5
    assert red.queries.shape == (137, 192) and 0.95 < red.queries.std() < 1.05  # randn
    assert red.norm.eps == 1e-5 and red.norm.weight.eq(1).all() and red.norm.bias.eq(0).all()
    model = small_vit(depth=4)
    td.attach(model, "patchmerger", blocks=[1, 3], schedule=td.Constant(0.5), when="always")
    own = 2 * 32 * 64 * 48 + 2 * 16 * 32 * 48  # Q yᵀ and A y per site
    assert attached_macs(model, 32) == count_macs(model, torch.randn(1, 3, 32, 32))
    assert attached_macs(model, 32) - attached_macs(model, 32, overhead=False) == own


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0, "keep": 4}, r"dim: 0 is outside the allowed range \[1, inf\)"),
    ({"dim": 8, "keep": 0}, r"keep: 0 is outside the allowed range \[1, inf\)"),
    ({"dim": 8, "keep": 5, "tokens_in": 4}, r"keep: 5 is outside the allowed range \[1, 4\]"),
])
def test_patchmerger_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatchMerger(**kwargs)
    with pytest.raises(ValueError, match=r"reducer_args: patchmerger has no argument 'scale'"):
        td.reducer("patchmerger", scale=1.0)
    inputs = td.SiteInputs(td.TokenState(1, (2, 2)))
    with pytest.raises(ValueError, match=r"keep: 4 is outside the allowed range \[1, 3\]"):
        PatchMerger(dim=8, keep=3)(torch.randn(1, 5, 8), 4, inputs)
