"""A naive model with soft merges before chosen blocks, for the SiT / PatchMerger / Sinkhorn tests: each
site's per-image merge is a function the test writes from the spec (never calling tokendrop), and the
site records are checked against its weights."""

import torch

from naive_blocks import attention, embed, head, mlp

RTOL = 1e-5
"""Weights within this relative distance of a maximum count as maximal: where a merge has collapsed the
tokens (Sinkhorn's later sites), float32 and float64 arg-maxes may pick different near-tied slots."""


def naive_model(model, x, merge_at, prop_attn=False):
    """Logits of ``model`` (one prefix token) on ``x`` with ``merge_at[i](z) -> (tokens (K, C), weights
    (N, K))`` applied to the patch tokens of one image before block ``i``, and per site the list of each
    image's weights. ``prop_attn``: every block after the first merge adds ``log size`` (patches per token
    by the arg-max of the weights, the CLS token 1) to each key's logits."""
    with torch.no_grad():
        x = embed(model, x)
        B, P = x.shape[0], x.shape[1] - 1
        carrier = [list(range(P)) for _ in range(B)]  # current token carrying each original patch
        bias, sites = None, []
        for i, block in enumerate(model.blocks):
            if i in merge_at:
                rows, weights = [], []
                for b in range(B):
                    tokens, w = merge_at[i](x[b, 1:])
                    owner = w.argmax(dim=1).tolist()
                    carrier[b] = [owner[t] for t in carrier[b]]
                    rows.append(torch.cat([x[b, :1], tokens.to(x.dtype)]))
                    weights.append(w)
                x = torch.stack(rows)
                sites.append(weights)
                if prop_attn:
                    k = x.shape[1] - 1
                    bias = torch.tensor([[1.0] + [float(c.count(s)) for s in range(k)] for c in carrier]).log()
            x, _, _ = attention(block, x, bias)
            x = mlp(block, x)
        return head(model, x), sites


def check_records(records, site_weights, keeps):
    """Every original patch is assigned to the output token its carrier weighs most, each output token's
    source is the patch of a token weighing most in it, sizes count the patches assigned (summing to P)."""
    assert [rec.kept for rec in records] == keeps
    B, P = records[0].assignment.shape
    carrier = torch.arange(P).expand(B, P)  # current token carrying each patch, before the site
    source = torch.arange(P).expand(B, P)  # original patch of each current token
    for rec, weights in zip(records, site_weights):
        assert (rec.assignment >= 0).all() and (rec.assignment < rec.kept).all()
        for b, w in enumerate(weights):
            best_slot = w >= w.max(dim=1, keepdim=True).values * (1 - RTOL)  # (N, K)
            assert best_slot[carrier[b], rec.assignment[b]].all()
            best_token = w >= w.max(dim=0, keepdim=True).values * (1 - RTOL)
            for k in range(rec.kept):
                assert int(rec.source[b, k]) in source[b][best_token[:, k]].tolist()
            assert torch.equal(rec.size[b], torch.bincount(rec.assignment[b], minlength=rec.kept).float())
        assert rec.size.sum(dim=1).tolist() == [P] * B
        carrier, source = rec.assignment, rec.source


def layer_norm(z, weight, bias, eps=1e-5):
    """LayerNorm over the last axis, written out."""
    mean = z.mean(dim=-1, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * weight + bias


def softmax_over_tokens(logits):
    """Softmax of (N, K) logits over the N tokens (axis 0), written out."""
    e = torch.exp(logits - logits.max(dim=0, keepdim=True).values)
    return e / e.sum(dim=0, keepdim=True)


def check_train_only_and_learns(name, param_names):
    """With ``when="train"`` at blocks 1 and 3 of a small ViT, evaluation equals the plain model's, and a
    training forward + backward gives finite gradients reaching each of the method's ``param_names``."""
    import tokendrop as td
    from naive_blocks import images, small_vit

    model = small_vit(depth=4)
    x = images(32)
    with torch.no_grad():
        plain = model(x)
    td.attach(model, name, blocks=[1, 3], schedule=td.Constant(0.5), when="train")
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    model.train()
    model(x).logsumexp(dim=1).sum().backward()
    assert [rec.kept for rec in td.last_reduction(model).records] == [32, 16]
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    for block in (1, 3):
        for param in param_names:
            assert grads[f"blocks.{block}.token_site.reducer.{param}"].abs().sum() > 0, (block, param)


def check_save_and_load(factory, param, shape, tol=0.0):
    """Two small ViTs with the method's sites built from ``factory(seed=…)`` differ; loading one's state
    dict (whose ``blocks.3.token_site.reducer.{param}`` has ``shape``) into the other makes them equal."""
    import tokendrop as td
    from naive_blocks import images, small_vit

    x = images(32)
    model, other = small_vit(depth=4), small_vit(depth=4)
    td.attach(model, factory(seed=1), blocks=[1, 3], schedule=td.Constant(0.5), when="always")
    td.attach(other, factory(seed=2), blocks=[1, 3], schedule=td.Constant(0.5), when="always")
    state = model.state_dict()
    assert state[f"blocks.3.token_site.reducer.{param}"].shape == shape
    with torch.no_grad():
        before = other(x)
        other.load_state_dict(state)
        assert (other(x) - before).abs().max() > 1e-4
        torch.testing.assert_close(other(x), model(x), atol=tol, rtol=tol)
