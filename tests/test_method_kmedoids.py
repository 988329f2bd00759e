"""K-Medoids against a naive re-implementation of its spec (weighted by the previous block's attention
column sums, 3 iterations, medoid tokens in slot order), plus its bookkeeping and errors."""

import pytest
import torch

import tokendrop as td
from naive_blocks import attention, deit_tiny, embed, head, images, mlp, small_vit

P = 196


def naive_kmedoids(z, w, k, iters=3):
    """One image: tokens ``z`` (N, C), weights ``w`` (N,). Returns (medoids, assignment) as lists."""
    n = z.shape[0]
    zd = z.double()
    dist = ((zd[:, None] - zd[None]) ** 2).sum(-1).sqrt().tolist()
    w = w.tolist()
    cost = [w[i] * sum(dist[i]) for i in range(n)]
    medoids = sorted(range(n), key=lambda i: -w[i])[:k]

    def assign():
        return [min(range(k), key=lambda c: dist[i][medoids[c]]) for i in range(n)]

    for _ in range(iters):
        a = assign()
        for c in range(k):
            members = [i for i in range(n) if a[i] == c]
            medoids[c] = min(members, key=lambda i: cost[i]) if members else 0
    return medoids, assign()


def naive_model(model, x, keep_at):
    """The model with K-Medoids before the blocks in ``keep_at``; returns the logits and, per site,
    (assignment of every original patch, medoid patch of every output token, sizes)."""
    with torch.no_grad():
        x = embed(model, x)
        B = x.shape[0]
        carrier = [list(range(P)) for _ in range(B)]  # current token carrying each original patch
        patch_of = [list(range(P)) for _ in range(B)]  # original patch each current token is
        sites, probs = [], None
        for i, block in enumerate(model.blocks):
            if i in keep_at:
                colsum = probs.sum(dim=(1, 2))[:, 1:]
                rows = []
                for b in range(B):
                    medoids, a = naive_kmedoids(x[b, 1:], colsum[b], keep_at[i])
                    rows.append(torch.cat([x[b, :1], x[b, 1:][medoids]]))
                    carrier[b] = [a[t] for t in carrier[b]]
                    patch_of[b] = [patch_of[b][m] for m in medoids]
                x = torch.stack(rows)
                sizes = [[float(sum(1 for t in carrier[b] if t == c)) for c in range(keep_at[i])] for b in range(B)]
                sites.append((torch.tensor(carrier), torch.tensor(patch_of), torch.tensor(sizes)))
            x, probs, _ = attention(block, x)
            x = mlp(block, x)
        return head(model, x), sites


def test_kmedoids_protocol_matches_naive():
    model = deit_tiny()
    x = images()
    ref, ref_sites = naive_model(model, x, {3: 137, 6: 96, 9: 67})
    td.attach(model, "kmedoids", blocks=[3, 6, 9], schedule=td.Constant(0.7), when="always", relative_to="original")
    assert td.expected_patch_tokens(model) == [137, 96, 67]
    with torch.no_grad():
        out = model(x)
    records = td.last_reduction(model).records
    assert [rec.kept for rec in records] == [137, 96, 67]
    for rec, (assignment, centres, sizes) in zip(records, ref_sites):
        # Compared slot-order-free: the medoids start in descending weight order, and two weights of this
        # input differ by 2e-7 (float32 rounding of the column sums), so their slots may swap.
        assert (rec.assignment >= 0).all() and rec.size.sum(dim=1).tolist() == [P, P]
        assert torch.equal(rec.source.sort(dim=1).values, centres.sort(dim=1).values)  # the medoid patches
        assert torch.equal(rec.source.gather(1, rec.assignment), centres.gather(1, assignment))  # each patch's medoid
        order, ref_order = rec.source.argsort(dim=1), centres.argsort(dim=1)
        assert torch.equal(rec.size.gather(1, order), sizes.gather(1, ref_order))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the comparison can fail: keeping the top-weighted tokens without iterating differs
    td.detach(model)
    td.attach(model, td.reducer("kmedoids", iters=1), blocks=[3, 6, 9], schedule=td.Constant(0.7), when="always",
              relative_to="original")
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-3


def test_kmedoids_empty_cluster_takes_token_zero():
    from tokendrop.methods.kmedoids import k_medoids

    # tokens 0 and 1 are identical and the two heaviest: both start as medoids, every token joins the
    # first (ties go to the first centre), so cluster 1 is empty and takes token 0; cluster 0 takes the
    # member with the smallest weight × total distance (token 2: 0.1 · 19)
    z = torch.tensor([[[5.0], [5.0], [0.0], [9.0]]])
    w = torch.tensor([[3.0, 2.0, 0.1, 0.2]])
    medoids, assignment = k_medoids(z, w, k=2, iters=1)
    assert medoids[0].tolist() == [2, 0] == naive_kmedoids(z[0], w[0], 2, iters=1)[0]
    assert assignment[0].tolist() == [1, 1, 0, 1]  # recomputed after the loop: 5 is nearer 5 than 0


def test_kmedoids_train_only_leaves_evaluation_identical_and_gradients_are_finite():
    model = small_vit(depth=4)
    x = images(32)
    with torch.no_grad():
        plain = model(x)
    td.attach(model, "kmedoids", blocks=[1, 3], schedule=td.Constant(0.5), when="train")
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    model.train()
    model(x).logsumexp(dim=1).sum().backward()
    assert [rec.kept for rec in td.last_reduction(model).records] == [32, 16]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0


def test_kmedoids_bad_arguments():
    with pytest.raises(ValueError, match="iters: "):
        td.reducer("kmedoids", iters=0)
    with pytest.raises(ValueError, match="blocks: .*block 0 has none"):
        td.attach(small_vit(depth=2), "kmedoids", blocks=[0])
    state = td.TokenState(1, (2, 2))
    inputs = td.SiteInputs(state, prev_attention_colsum=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"keep: 5 clusters for 4 tokens"):
        td.reducer("kmedoids")(torch.randn(1, 5, 8), 5, inputs)
