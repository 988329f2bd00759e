"""SiT token slimming against a naive re-implementation of its spec (LN → Linear C→C/2 → GELU → Linear
C/2→K, learned scale, softmax over the tokens, combination of the raw tokens), plus its bookkeeping,
gradients, saving, MACs and errors."""

import math

import pytest
import torch

import tokendrop as td
from naive_blocks import deit_tiny, images, small_vit
from naive_soft_merge import (check_records, check_save_and_load, check_train_only_and_learns, layer_norm, naive_model,
                              softmax_over_tokens)
from tokendrop.bench.flops import attached_macs, count_macs
from tokendrop.methods import SiT


def sit_factory(seed=0, std=0.1, scale=2.0, **kwargs):
    """Per site: a SiT whose parameters are seeded with the block index and large enough (and its scale
    other than 1) that the weighting matters."""

    def build(facts):
        red = td.reducer("sit", **kwargs)(facts)
        gen = torch.Generator().manual_seed(1000 * seed + facts.block)
        with torch.no_grad():
            for p in red.parameters():
                p.normal_(0.0, std, generator=gen)
            red.mlp[0].weight.add_(1.0)
            red.scale.fill_(scale)
        return red

    return build


def naive_sit(red, keep, over_tokens=True):
    """The spec's merge of one image ``z`` (N, C) into ``keep`` tokens (the first slots), with ``red``'s
    parameters copied out, in float64. ``over_tokens=False`` (a wrong detail) takes the
    softmax over the slots instead."""
    ln, fc1, _, fc2 = red.mlp
    g, b, w1, b1, w2, b2 = (p.detach().double().clone() for p in
                            (ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias))
    s = red.scale.detach().double().item()

    def merge(z):
        z = z.double()
        h = layer_norm(z, g, b) @ w1.T + b1
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        logits = ((h @ w2.T + b2) * s)[:, :keep]
        a = softmax_over_tokens(logits) if over_tokens else softmax_over_tokens(logits.T).T
        return a.T @ z, a  # output k = Σ_i a[i, k] z_i

    return merge


def naive_merges(model, keeps, **kwargs):
    return {s.block: naive_sit(s.reducer, k, **kwargs) for s, k in zip(td.sites(model), keeps)}


def test_sit_protocol_matches_naive():
    model = deit_tiny()
    x = images()
    td.attach(model, sit_factory(), blocks=[3, 6, 9], schedule=td.Constant(0.7), when="always",
              relative_to="original")
    assert td.expected_patch_tokens(model) == [137, 96, 67]
    assert [s.reducer.slots for s in td.sites(model)] == [137, 96, 67]
    with torch.no_grad():
        out = model(x)
    ref, ref_sites = naive_model(model, x, naive_merges(model, [137, 96, 67]))
    check_records(td.last_reduction(model).records, ref_sites, [137, 96, 67])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the comparison can fail: a softmax over the slots instead of the tokens gives other logits
    wrong, _ = naive_model(model, x, naive_merges(model, [137, 96, 67], over_tokens=False))
    assert (out - wrong).abs().max() > 1e-3


def test_sit_curriculum_uses_the_first_slots_with_proportional_attention():
    """Built at epoch 0 (nothing dropped: K = tokens entering), later keeping fewer: the first slots."""
    model = small_vit(depth=4)
    x = images(32)
    td.attach(model, sit_factory(prop_attn=True), blocks=[1, 3], schedule=td.Linear(0, 10, final=0.5), when="always")
    assert [s.reducer.slots for s in td.sites(model)] == [64, 64]
    td.set_epoch(model, 10)
    with torch.no_grad():
        out = model(x)
    ref, ref_sites = naive_model(model, x, naive_merges(model, [32, 16]), prop_attn=True)
    check_records(td.last_reduction(model).records, ref_sites, [32, 16])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    without, _ = naive_model(model, x, naive_merges(model, [32, 16]))
    assert (out - without).abs().max() > 1e-3  # the size bias matters here


def test_sit_train_only_leaves_evaluation_identical_and_learns():
    check_train_only_and_learns("sit", ("mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "scale"))


def test_sit_parameters_save_and_load():
    check_save_and_load(sit_factory, "mlp.3.weight", (16, 24))


def test_sit_init_defaults_and_macs():
    red = SiT(dim=192, keep=137)
    assert red.default_position == "before" and not red.prop_attn and red.scale.shape == (1, 1, 1)
    assert red.scale.item() == 1.0 and red.mlp[0].eps == 1e-5
    assert isinstance(red.mlp[2], torch.nn.GELU) and red.mlp[2].approximate == "none"
    assert red.mlp[0].weight.eq(1).all() and red.mlp[0].bias.eq(0).all()
    for m, shape in ((red.mlp[1], (96, 192)), (red.mlp[3], (137, 96))):
        assert m.weight.shape == shape and m.bias.abs().max() == 0
        assert m.weight.abs().max() <= 2.0 and 0.015 < m.weight.std() < 0.025
    # the method's own matmuls by hand: both Linears (all 32 slots) and Aᵀz for the slots used
    model = small_vit(depth=4)
    td.attach(model, td.reducer("sit", keep=32), blocks=[1, 3], schedule=td.Constant(0.5), when="always")
    own = sum(n * 48 * 24 + n * 24 * 32 + k * n * 48 for n, k in ((64, 32), (32, 16)))
    assert attached_macs(model, 32) == count_macs(model, torch.randn(1, 3, 32, 32))
    assert attached_macs(model, 32) - attached_macs(model, 32, overhead=False) == own


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 1, "keep": 4}, r"dim: 1 is outside the allowed range \[2, inf\)"),
    ({"dim": 8, "keep": 0}, r"keep: 0 is outside the allowed range \[1, inf\)"),
    ({"dim": 8, "keep": 5, "tokens_in": 4}, r"keep: 5 is outside the allowed range \[1, 4\]"),
    ({"dim": 8, "keep": 2.5}, r"keep: 2.5 is outside"),
])
def test_sit_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SiT(**kwargs)
    with pytest.raises(ValueError, match=r"reducer_args: sit has no argument 'scale'"):
        td.reducer("sit", scale=1.0)


def test_sit_bad_keep_at_run_time():
    inputs = td.SiteInputs(td.TokenState(1, (2, 2)))
    with pytest.raises(ValueError, match=r"keep: 4 is outside the allowed range \[1, 3\]"):
        SiT(dim=8, keep=3)(torch.randn(1, 5, 8), 4, inputs)
    with pytest.raises(ValueError, match=r"keep: 5 clusters for 4 tokens is outside the allowed range \[1, 4\]"):
        SiT(dim=8, keep=6)(torch.randn(1, 5, 8), 5, inputs)
