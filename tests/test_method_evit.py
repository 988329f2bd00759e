"""EViT against a naive re-implementation of zoo-spec §2 (hand-written DeiT, explicit attention)."""

import math

import pytest
import torch

import tokendrop as td
from naive_deit_pruning import BLOCKS, assert_gap, assert_records_match, deit_tiny, naive_forward, targets


def evit_step(keep):
    """Top-``keep`` by head-mean CLS attention (descending), then one token Σ a_j x_j over the rest."""

    def step(x, attn, k, v, tokens):
        a = attn[:, 0, 1:].mean(dim=0)
        scores = a.tolist()
        assert_gap(scores, keep)
        order = sorted(range(len(scores)), key=lambda j: -scores[j])
        kept, pruned = order[:keep], sorted(order[keep:])
        fused = sum(a[j] * x[1 + j] for j in pruned)  # weights not renormalised
        x = torch.cat([x[:1], x[[1 + j for j in kept]], fused[None]])
        return x, [tokens[j] for j in kept] + [set().union(*(tokens[j] for j in pruned))]

    return step


def attach_evit(model, when="always"):
    return td.attach(model, "evit", blocks=list(BLOCKS), schedule=td.Constant(0.7), when=when, relative_to="original")


def test_matches_naive_logits_kept_tokens_and_assignment():
    model = deit_tiny(qk_scale=4.0)
    images = torch.randn(2, 3, 224, 224)
    steps = {b: evit_step(keep) for b, keep in zip(BLOCKS, targets())}
    with torch.no_grad():
        naive = [naive_forward(model, img, steps) for img in images]
        out = attach_evit(model)(images)
    torch.testing.assert_close(out, torch.stack([logits for logits, _ in naive]), atol=1e-4, rtol=0)
    records = td.last_reduction(model).records
    assert [r.kept for r in records] == [138, 97, 68]  # the fused token included
    assert td.expected_patch_tokens(model) == [138, 97, 68]
    assert_records_match(records, [history for _, history in naive])
    # the fused token comes last and its size counts the patches it carries; no patch is dropped
    last = records[-1]
    assert last.size[:, -1].tolist() == (last.assignment == 67).sum(dim=1).float().tolist()
    assert (last.assignment >= 0).all() and (last.size[:, -1] > 1).all()


def test_fused_token_has_gradient_through_the_attention():
    model = deit_tiny(qk_scale=4.0)
    images = torch.randn(2, 3, 224, 224)
    direction = torch.randn(1000)
    steps = {b: evit_step(keep) for b, keep in zip(BLOCKS, targets())}
    param = model.blocks[3].attn.qkv.weight
    naive_loss = sum(naive_forward(model, img, steps)[0] @ direction for img in images)
    (expected,) = torch.autograd.grad(naive_loss, param)
    attach_evit(model)
    model.train()
    loss = (model(images) @ direction).sum()
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-3)
    # with the fused weights detached the gradient of block 3's queries and keys would differ
    detached = {b: _detached_step(keep) for b, keep in zip(BLOCKS, targets())}
    other = sum(naive_forward(model, img, detached)[0] @ direction for img in images)
    (wrong,) = torch.autograd.grad(other, param)
    assert (wrong - expected).abs().max() > 1e-4


def _detached_step(keep):
    step = evit_step(keep)
    return lambda x, attn, k, v, tokens: step(x, attn.detach(), k, v, tokens)


def test_when_train_leaves_evaluation_identical():
    model = deit_tiny(qk_scale=4.0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = model(images)
        attach_evit(model, when="train")
        assert torch.equal(model(images), plain)
        model.train()
        assert (model(images) - plain).abs().max() > 1e-4  # the site is live in training


def test_cosine_schedule_expresses_the_keep_rate_warm_up():
    """EViT's own cosine keep-rate warm-up from 1 to r is ``td.Cosine`` on the drop ratio."""
    model = deit_tiny()
    r, start, end = 0.7, 10, 110
    td.attach(model, "evit", blocks=list(BLOCKS), schedule=td.Cosine(start, end, initial=0.0, final=1 - r), when="train")
    for epoch in (0, 10, 35, 60, 110, 150):
        td.set_epoch(model, epoch)
        progress = min(max((epoch - start) / (end - start), 0.0), 1.0)
        rate = r + (1 - r) * (1 + math.cos(math.pi * progress)) / 2  # the warm-up, written independently
        counts, n = [], 196
        for _ in BLOCKS:
            keep = int(round(n * rate, 9))
            n = keep + 1 if keep < n else n
            counts.append(n)
        assert td.expected_patch_tokens(model) == counts


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="fuse"):
        td.reducer("evit", fuse=False)
    with pytest.raises(ValueError, match="^position"):
        td.attach(deit_tiny(), "evit", blocks=[3], position="before")
