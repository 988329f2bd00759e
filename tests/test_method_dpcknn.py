"""DPC-KNN with the CTM token weight against a naive re-implementation of its spec (k-NN densities with
seeded noise, distance to a denser token, centres by density × distance, learned-weight cluster means),
plus its bookkeeping, gradients and errors."""

import math

import pytest
import torch

import tokendrop as td
from naive_blocks import attention, deit_tiny, embed, head, images, mlp, small_vit

P = 196


def naive_dpc_knn(z, noise, clusters, k=5):
    """One image: tokens ``z`` (N, C), uniform noise (N,). Returns (centres, assignment) as lists."""
    n, c = z.shape
    zd = z.double()
    dist = (((zd[:, None] - zd[None]) ** 2).sum(-1).sqrt() / math.sqrt(c)).tolist()
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:k]) / k) + 1e-6 * noise[i] for i in range(n)]
    farthest = max(max(row) for row in dist)
    delta = [min((dist[i][j] for j in range(n) if density[j] > density[i]), default=farthest) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -delta[i] * density[i])[:clusters]
    assignment = [min(range(clusters), key=lambda s: dist[centres[s]][i]) for i in range(n)]
    for s, i in enumerate(centres):
        assignment[i] = s
    return centres, assignment


def naive_model(model, x, keep_at, linear_at):
    """The model with DPC-KNN before the blocks in ``keep_at`` (noise from a generator seeded with the block
    index, token weight ``exp(linear_at[i](z))``); returns the logits and per site (assignment of every
    original patch, centre patch of every output token, sizes)."""
    with torch.no_grad():
        x = embed(model, x)
        B = x.shape[0]
        carrier = [list(range(P)) for _ in range(B)]
        patch_of = [list(range(P)) for _ in range(B)]
        sites = []
        for i, block in enumerate(model.blocks):
            if i in keep_at:
                K, z = keep_at[i], x[:, 1:]
                noise = torch.rand((B, z.shape[1]), generator=torch.Generator().manual_seed(i)).tolist()
                w = (z @ linear_at[i].weight.T + linear_at[i].bias).squeeze(-1).exp()
                rows = []
                for b in range(B):
                    centres, a = naive_dpc_knn(z[b], noise[b], K)
                    a_t = torch.tensor(a)
                    merged = [(w[b, a_t == s, None] * z[b, a_t == s]).sum(0) / (w[b, a_t == s].sum() + 1e-6)
                              for s in range(K)]
                    rows.append(torch.cat([x[b, :1], torch.stack(merged)]))
                    carrier[b] = [a[t] for t in carrier[b]]
                    patch_of[b] = [patch_of[b][m] for m in centres]
                x = torch.stack(rows)
                sizes = [[float(sum(1 for t in carrier[b] if t == s)) for s in range(K)] for b in range(B)]
                sites.append((torch.tensor(carrier), torch.tensor(patch_of), torch.tensor(sizes)))
            x, _, _ = attention(block, x)
            x = mlp(block, x)
        return head(model, x), sites


def dpcknn_factory(std=0.05):
    """Per site: a DPC-KNN whose noise generator is seeded with the block index and whose token-weight
    Linear has weights large enough that the weighting matters."""

    def build(facts):
        red = td.reducer("dpcknn", dim=facts.dim, generator=torch.Generator().manual_seed(facts.block))
        with torch.no_grad():
            red.score.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(100 + facts.block))
            red.score.bias.fill_(0.1)
        return red

    return build


def test_dpcknn_protocol_matches_naive():
    model = deit_tiny()
    x = images()
    td.attach(model, dpcknn_factory(), blocks=[3, 6, 9], schedule=td.Constant(0.7), when="always",
              relative_to="original")
    assert td.expected_patch_tokens(model) == [137, 96, 67]
    with torch.no_grad():
        out = model(x)
    linear_at = {s.block: s.reducer.score for s in td.sites(model)}
    ref, ref_sites = naive_model(model, x, {3: 137, 6: 96, 9: 67}, linear_at)
    records = td.last_reduction(model).records
    assert [rec.kept for rec in records] == [137, 96, 67]
    for rec, (assignment, centres, sizes) in zip(records, ref_sites):
        assert torch.equal(rec.assignment, assignment) and (rec.assignment >= 0).all()
        assert torch.equal(rec.source, centres)  # each token's centre patch
        assert torch.equal(rec.size, sizes) and rec.size.sum(dim=1).tolist() == [P, P]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the comparison can fail: plain cluster means (a constant token weight) give other logits
    for lin in linear_at.values():
        torch.nn.init.zeros_(lin.weight)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-3


def test_dpcknn_linear_learns_and_train_only_leaves_evaluation_identical():
    model = small_vit(depth=4)
    x = images(32)
    with torch.no_grad():
        plain = model(x)
    td.attach(model, lambda f: td.reducer("dpcknn", dim=f.dim), blocks=[1, 3], schedule=td.Constant(0.5), when="train")
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    model.train()
    model(x).logsumexp(dim=1).sum().backward()
    assert [rec.kept for rec in td.last_reduction(model).records] == [32, 16]
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    for block in (1, 3):
        assert grads[f"blocks.{block}.token_site.reducer.score.weight"].abs().sum() > 0
    assert "blocks.1.token_site.reducer.score.weight" in model.state_dict()


def test_dpcknn_bad_arguments():
    with pytest.raises(ValueError, match="k: 0 is outside"):
        td.reducer("dpcknn", dim=8, k=0)
    with pytest.raises(ValueError, match="dim: 0 is outside"):
        td.reducer("dpcknn", dim=0)
    inputs = td.SiteInputs(td.TokenState(1, (2, 2)))
    with pytest.raises(ValueError, match=r"keep: 5 clusters for 4 tokens"):
        td.reducer("dpcknn", dim=8)(torch.randn(1, 5, 8), 5, inputs)
