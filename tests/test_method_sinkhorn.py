"""Sinkhorn merging against a naive re-implementation of its spec (unit tokens, unit-renormalised learned
centres, log-space Sinkhorn with unbalanced −log(K+N) marginals, sums of unit tokens), plus its
bookkeeping, gradients, saving, MACs and errors."""

import math

import pytest
import torch

import tokendrop as td
from naive_blocks import deit_tiny, images, small_vit
from naive_soft_merge import check_records, check_save_and_load, check_train_only_and_learns, naive_model
from tokendrop.bench.flops import attached_macs, count_macs
from tokendrop.methods import Sinkhorn
from tokendrop.methods.sinkhorn import log_sinkhorn


def sinkhorn_factory(seed=0, **kwargs):
    """Per site: a Sinkhorn with ``randn`` centres seeded with the block index."""

    def build(facts):
        red = td.reducer("sinkhorn", **kwargs)(facts)
        with torch.no_grad():
            red.centres.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1000 * seed + facts.block))
        return red

    return build


def lse(a, dim):
    """log Σ exp over ``dim``, written out (stable)."""
    m = a.max(dim=dim, keepdim=True).values
    return (m + torch.log(torch.exp(a - m).sum(dim=dim, keepdim=True))).squeeze(dim)


def naive_sinkhorn(centres, keep, eps=1.0, iters=3):
    """The spec's merge of one image ``z`` (N, C) with the centres (K, C) as they were before the forward
    (renormalised here), in float64."""
    v_hat = centres.double()[:keep]
    v_hat = v_hat / v_hat.norm(dim=1, keepdim=True)

    def merge(z):
        z_hat = z.double() / z.double().norm(dim=1, keepdim=True)
        n = z_hat.shape[0]
        Z = (z_hat @ v_hat.T).T / eps  # (K, N)
        log_mu = log_nu = -math.log(keep + n)
        u, v = torch.zeros(keep, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for _ in range(iters):
            u = log_mu - lse(Z + v[None, :], dim=1)
            v = log_nu - lse(Z + u[:, None], dim=0)
        T = torch.exp(Z + u[:, None] + v[None, :] + math.log(keep + n))
        return T @ z_hat, T.T  # output k = Σ_i W[i, k] ẑ_i

    return merge


def centres_before(model):
    return {s.block: s.reducer.centres.detach().clone() for s in td.sites(model)}


def test_sinkhorn_protocol_matches_naive():
    model = deit_tiny()
    x = images()
    td.attach(model, sinkhorn_factory(), blocks=[3, 6, 9], schedule=td.Constant(0.7), when="always",
              relative_to="original")
    assert td.expected_patch_tokens(model) == [137, 96, 67]
    raw = centres_before(model)
    assert all((v.norm(dim=1) - 1).abs().max() > 0.1 for v in raw.values())
    with torch.no_grad():
        out = model(x)
    for s in td.sites(model):  # renormalised in place, rows of unit length
        torch.testing.assert_close(s.reducer.centres.norm(dim=1), torch.ones(s.reducer.slots))
    keeps = {3: 137, 6: 96, 9: 67}
    ref, ref_sites = naive_model(model, x, {b: naive_sinkhorn(raw[b], keeps[b]) for b in keeps})
    check_records(td.last_reduction(model).records, ref_sites, [137, 96, 67])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)  # renormalising again changes nothing
    # the comparison can fail: eps 0.5 instead of 1 gives other logits (at eps 1 the cosine similarities
    # of random centres, |s| ≲ 0.2, leave a near-uniform plan that converges in one iteration)
    wrong, _ = naive_model(model, x, {b: naive_sinkhorn(raw[b], keeps[b], eps=0.5) for b in keeps})
    assert (out - wrong).abs().max() > 1e-3


def test_sinkhorn_options_and_first_centres_match_naive():
    model = small_vit(depth=4)
    x = images(32)
    td.attach(model, sinkhorn_factory(eps=0.05, iters=5), blocks=[1, 3], schedule=td.Linear(0, 10, final=0.5),
              when="always")
    assert [(s.reducer.slots, s.reducer.eps, s.reducer.iters) for s in td.sites(model)] == [(64, 0.05, 5)] * 2
    td.set_epoch(model, 10)
    raw = centres_before(model)
    with torch.no_grad():
        out = model(x)
    ref, ref_sites = naive_model(model, x, {1: naive_sinkhorn(raw[1], 32, 0.05, 5),
                                            3: naive_sinkhorn(raw[3], 16, 0.05, 5)})
    check_records(td.last_reduction(model).records, ref_sites, [32, 16])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the comparison can fail: one iteration fewer is more than twice the tolerance away
    wrong, _ = naive_model(model, x, {1: naive_sinkhorn(raw[1], 32, 0.05, 4), 3: naive_sinkhorn(raw[3], 16, 0.05, 4)})
    assert (out - wrong).abs().max() > 2e-4


def test_log_sinkhorn_marginals():
    """After the last step every token's weights sum to 1, so the cluster sums average N / K."""
    scores = torch.randn(2, 30, 7, generator=torch.Generator().manual_seed(0))
    w = log_sinkhorn(scores, 1.0, 3).exp()
    torch.testing.assert_close(w.sum(dim=2), torch.ones(2, 30))
    torch.testing.assert_close(w.sum(dim=1).mean(dim=1), torch.full((2,), 30 / 7))
    assert (w.sum(dim=1) - 30 / 7).abs().max() > 1e-2  # unbalanced: the clusters differ


def test_sinkhorn_train_only_leaves_evaluation_identical_and_learns():
    check_train_only_and_learns("sinkhorn", ("centres",))


def test_sinkhorn_parameters_save_and_load():
    check_save_and_load(sinkhorn_factory, "centres", (16, 48), tol=1e-6)  # both renormalise their centres


def test_sinkhorn_init_defaults_and_macs():
    torch.manual_seed(0)
    red = Sinkhorn(dim=192, keep=137)
    assert red.default_position == "before" and not red.prop_attn and (red.eps, red.iters) == (1.0, 3)
    assert red.centres.shape == (137, 192) and 0.95 < red.centres.std() < 1.05  # randn until the first forward
    model = small_vit(depth=4)
    td.attach(model, "sinkhorn", blocks=[1, 3], schedule=td.Constant(0.5), when="always")
    own = 2 * 32 * 64 * 48 + 2 * 16 * 32 * 48  # ẑ Vᵀ and Wᵀ ẑ per site
    assert attached_macs(model, 32) == count_macs(model, torch.randn(1, 3, 32, 32))
    assert attached_macs(model, 32) - attached_macs(model, 32, overhead=False) == own


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0, "keep": 4}, r"dim: 0 is outside the allowed range \[1, inf\)"),
    ({"dim": 8, "keep": 0}, r"keep: 0 is outside the allowed range \[1, inf\)"),
    ({"dim": 8, "keep": 5, "tokens_in": 4}, r"keep: 5 is outside the allowed range \[1, 4\]"),
    ({"dim": 8, "keep": 2, "eps": 0.0}, r"eps: 0.0 is outside the allowed range \(0, inf\)"),
    ({"dim": 8, "keep": 2, "eps": float("inf")}, r"eps: inf is outside the allowed range \(0, inf\)"),
    ({"dim": 8, "keep": 2, "iters": 0}, r"iters: 0 is outside the allowed range \[1, inf\)"),
    ({"dim": 8, "keep": 2, "iters": 2.0}, r"iters: 2.0 is outside the allowed range \[1, inf\)"),
])
def test_sinkhorn_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sinkhorn(**kwargs)
    with pytest.raises(ValueError, match=r"reducer_args: sinkhorn has no argument 'tau'"):
        td.reducer("sinkhorn", tau=1.0)
    inputs = td.SiteInputs(td.TokenState(1, (2, 2)))
    with pytest.raises(ValueError, match=r"keep: 4 is outside the allowed range \[1, 3\]"):
        Sinkhorn(dim=8, keep=3)(torch.randn(1, 5, 8), 4, inputs)
