"""ToMe against a naive re-implementation written from the spec (explicit attention with the size bias,
bipartite matching in Python, the official output order), plus its schedules, cap and bookkeeping."""

import math

import pytest
import torch

import tokendrop as td
from naive_blocks import attention, deit_tiny, embed, head, images, mlp, small_vit


def naive_tome_merge(x, size, metric, r, num_prefix):
    """One image: tokens ``x`` (T, C), sizes (T,), head-mean keys (T, D). Official bipartite soft matching
    with the prefix protected (CLS: no A row; distillation token: no B column), size-weighted average,
    output ``[A unmerged ascending, B in order]`` (distilled: ``[cls, dist, A rest, B rest]``)."""
    t = x.shape[0]
    r = min(r, (t - num_prefix) // 2)
    if r <= 0:
        return x, size
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cosine = (unit[a_pos] @ unit[b_pos].T).tolist()
    best = []  # (score, B slot) per A token
    for a, row in zip(a_pos, cosine):
        sims = [-math.inf if (a < num_prefix or b < num_prefix) else s for b, s in zip(b_pos, row)]
        j = max(range(len(b_pos)), key=lambda j: sims[j])
        best.append((sims[j], j))
    ranked = sorted(range(len(a_pos)), key=lambda i: -best[i][0])
    merged = set(ranked[:r])
    members = {j: [b] for j, b in enumerate(b_pos)}
    for i in merged:
        members[best[i][1]].append(a_pos[i])
    unm = [a_pos[i] for i in range(len(a_pos)) if i not in merged]

    def avg(idx):
        s = size[idx]
        return (x[idx] * s[:, None]).sum(0) / s.sum(), s.sum()

    b_tokens = [avg(members[j]) for j in range(len(b_pos))]
    a_tokens = [(x[a], size[a]) for a in unm]
    if num_prefix == 2:
        order = a_tokens[:1] + b_tokens[:1] + a_tokens[1:] + b_tokens[1:]
    else:
        order = a_tokens + b_tokens
    return torch.stack([o[0] for o in order]), torch.stack([o[1] for o in order])


def naive_tome(model, x, r_at, prop_attn, num_prefix):
    """The whole model with ToMe merging ``r_at[i]`` tokens inside block i; returns logits and the patch
    sizes after each merging block."""
    with torch.no_grad():
        x = embed(model, x)
        size = torch.ones(x.shape[:2])
        sizes = []
        for i, block in enumerate(model.blocks):
            x, _, keys = attention(block, x, size.log() if prop_attn else None)
            if r_at.get(i, 0) > 0:
                metric, t = keys.mean(dim=1), x.shape[1]
                out = [naive_tome_merge(x[b], size[b], metric[b], r_at[i], num_prefix) for b in range(x.shape[0])]
                x, size = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
                if x.shape[1] < t:
                    sizes.append(size[:, num_prefix:])
            x = mlp(block, x)
        return head(model, x), sizes


def protocol_r(keep_rate=0.7, p=196):
    """Per-stage r of the protocol: r_s = K_{s-1} − K_s with K_s = int(P·r^s), K_0 = P (blocks 3/6/9)."""
    k = [p] + [int(p * keep_rate ** s) for s in (1, 2, 3)]
    return {3: k[0] - k[1], 6: k[1] - k[2], 9: k[2] - k[3]}


@pytest.mark.parametrize("distilled,prop_attn", [(False, True), (False, False), (True, True)])
def test_tome_protocol_matches_naive(distilled, prop_attn):
    model = deit_tiny(distilled)
    x = images()
    ref, ref_sizes = naive_tome(model, x, protocol_r(), prop_attn, num_prefix=2 if distilled else 1)
    td.attach(model, td.reducer("tome", prop_attn=prop_attn), blocks=[3, 6, 9], schedule=td.Constant(0.7),
              when="always", relative_to="original")
    with torch.no_grad():
        out = model(x)
    records = td.last_reduction(model).records
    assert [rec.kept for rec in records] == [137, 96, 67]
    for rec, size in zip(records, ref_sizes):
        assert torch.equal(rec.size, size)
        assert (rec.assignment >= 0).all() and rec.size.sum(dim=1).tolist() == [196.0, 196.0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the comparison can fail: the other proportional-attention setting gives other logits
    other, _ = naive_tome(model, x, protocol_r(), not prop_attn, num_prefix=2 if distilled else 1)
    assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("distilled,img_size", [(False, 32), (True, 28)])
def test_tome_every_block_matches_naive_with_the_cap(distilled, img_size):
    model = small_vit(distilled, img_size=img_size)
    x = images(img_size)
    prefix = 2 if distilled else 1
    ref, ref_sizes = naive_tome(model, x, {i: 8 for i in range(12)}, True, prefix)
    td.tome(model, 8)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    kept = [rec.kept for rec in td.last_reduction(model).records]
    assert kept == [s.shape[1] for s in ref_sizes] and kept[-1] == 1  # the cap (half the tokens) was hit
    assert td.expected_patch_tokens(model) == kept + [1] * (12 - len(kept))
    for rec, size in zip(td.last_reduction(model).records, ref_sizes):
        assert torch.equal(rec.size, size)


def test_tome_sizes_survive_a_later_pruning_site():
    model = small_vit(depth=6)
    td.attach(model, "tome", blocks=[1], schedule=td.Remove(20), when="always")
    td.attach(model, td.TopK("cls_attention"), blocks=[3], schedule=td.Constant(0.5), when="always")
    with torch.no_grad():
        model(images(32))
    merged, pruned = td.last_reduction(model).records
    assert merged.kept == 44 and pruned.kept == 22 and merged.size.max() > 1
    for b in range(2):
        size_of = dict(zip(merged.source[b].tolist(), merged.size[b].tolist()))
        assert pruned.size[b].tolist() == [size_of[s] for s in pruned.source[b].tolist()]
        # every patch the kept tokens carry is counted in their sizes
        assert (pruned.assignment[b] >= 0).sum().item() == pruned.size[b].sum().item()


def test_tome_curriculum_by_epoch_and_zero_r_is_the_plain_model():
    model = small_vit(depth=4)
    x = images(32)
    with torch.no_grad():
        plain = model(x)
    td.tome(model, [12, 4, 0])
    assert td.expected_patch_tokens(model) == [52, 40, 28, 16]
    td.set_epoch(model, 1)
    assert td.expected_patch_tokens(model) == [60, 56, 52, 48]
    td.set_epoch(model, 2)
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_tome_train_only_leaves_evaluation_identical_and_gradients_are_finite():
    model = small_vit(depth=4)
    x = images(32)
    with torch.no_grad():
        plain = model(x)
    td.attach(model, "tome", blocks=[1, 2], schedule=td.Remove(10), when="train")
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    model.train()
    model(x).logsumexp(dim=1).sum().backward()
    assert [rec.kept for rec in td.last_reduction(model).records] == [54, 44]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_tome_bad_arguments():
    model = small_vit(depth=2)
    with pytest.raises(ValueError, match="r: "):
        td.tome(model, -1)
    with pytest.raises(ValueError, match="position: 'before' has no attention"):
        td.attach(model, "tome", blocks=[0], position="before")
    assert td.sites(model) == []
