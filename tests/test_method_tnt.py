"""TNT (seed 002; zoo spec §12) against a naive re-implementation written here from the paper and the
spec: a hand-written ViT forward with explicit attention, α by hand, and the random-partition similarity
step with explicit loops."""

import pytest
import timm
import torch
import torch.nn.functional as F
from reference import vit_block, vit_embed, vit_head

import tokendrop as td
from tokendrop.methods.tnt import attach_tnt, prune_indices, random_sim_prune
from tokendrop.train.optim import param_groups

BLOCKS = (3, 6, 9)
RATE = 0.7
STRIDE = 1_000_003  # documented: a site at block b draws from a generator seeded with seed + STRIDE·b


def deit(seed=0):
    """Random-weight DeiT-Tiny with sharper attention (scaled qk)."""
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:384].mul_(4.0)
    return model


def sample_images(n=2):
    torch.manual_seed(100)
    return torch.randn(n, 3, 224, 224)


def heads(model):
    return {s.block: s.reducer.alpha_head for s in td.sites(model) if s.reducer.alpha_head is not None}


def widen_heads(model, seed=4):
    """Spread the α logits (no near-ties in the ranking, no underflow in the softmax)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for head in heads(model).values():
            head.weight.normal_(0.0, 0.3)
    return model


def with_tnt(model, when="always", **kwargs):
    td.attach(model, lambda f: td.reducer("tnt", dim=f.dim, **kwargs), blocks=BLOCKS, schedule=td.Constant(RATE),
              relative_to="original", when=when)
    return widen_heads(model)


def naive_logits(head, z):
    return (z @ head.weight.T + head.bias)[..., 0]


def naive_similarity_prune(importance, z, keep, s, gen, candidates_sorted=True):
    """Candidates: the top keep+s by importance, descending (or all tokens in order); one random
    permutation splits them into A (first half) and B; drop the s tokens of A most similar (max cosine) to
    B; the rest in descending importance. Returns (B, keep) indices and the smallest margin seen."""
    n = z.shape[1]
    out, margins = [], []
    c = keep + s
    cand = importance.sort(dim=1, descending=True).indices[:, :c] if candidates_sorted else torch.arange(n).expand(z.shape[0], n)
    perm = torch.randperm(c, generator=gen).tolist() if s else None
    for b in range(z.shape[0]):
        pos = cand[b].tolist()
        dropped = set()
        if s:
            a_side, b_side = perm[:c // 2], perm[c // 2:]
            za, zb = z[b, [pos[i] for i in a_side]], z[b, [pos[j] for j in b_side]]
            cosine = (za @ zb.T) / (za.norm(dim=1)[:, None] * zb.norm(dim=1)[None, :])
            best = cosine.max(dim=1).values.tolist()
            ranked = sorted(range(len(a_side)), key=lambda t: -best[t])
            if s < len(a_side):
                margins.append(best[ranked[s - 1]] - best[ranked[s]])
            dropped = {a_side[t] for t in ranked[:s]}
        rest = sorted((i for i in range(c) if i not in dropped), key=lambda i: -float(importance[b, pos[i]]))
        out.append([pos[i] for i in rest[:keep]])
    return torch.tensor(out), min(margins, default=1.0)


def naive_eval(model, images, plan, seed=0):
    """Before each block of ``plan`` ({block: (keep, s, importance)}) prune as TNT's evaluation step."""
    x = vit_embed(model, images)
    src = torch.arange(196).expand(images.shape[0], 196)
    kept, margins = [], []
    for i, blk in enumerate(model.blocks):
        if i in plan:
            keep, s, kind = plan[i]
            gen = torch.Generator().manual_seed(seed + STRIDE * i)
            z = x[:, 1:]
            if kind == "alpha":
                logits = naive_logits(model.blocks[i].token_site.reducer.alpha_head, z)
                importance = logits.softmax(-1)
                ranked = logits.sort(dim=1).values
                margins.append((ranked[:, 1:] - ranked[:, :-1]).min().item())
            else:
                importance = torch.rand(z.shape[:2], generator=gen)
            idx, margin = naive_similarity_prune(importance, z, keep, s, gen, candidates_sorted=kind == "alpha")
            margins.append(margin)
            x = torch.cat([x[:, :1], torch.stack([z[b][idx[b]] for b in range(z.shape[0])])], dim=1)
            src = torch.stack([src[b][idx[b]] for b in range(z.shape[0])])
            kept.append(src)
        x = vit_block(blk, x)
    return vit_head(model, x), kept, min(margins)


def naive_train(model, images, blocks, seed, beta=0.02):
    """After block l (before block l+1 in ``blocks``): α by hand; LayerNorm (eps 1e-6, no affine) of the
    whole sequence; patch tokens += β·(1 − α)·ε, ε ~ N(0, I) from the site's generator (or the global RNG)."""
    x = vit_embed(model, images)
    for i, blk in enumerate(model.blocks):
        if i in blocks:
            z = x[:, 1:]
            alpha = naive_logits(model.blocks[i].token_site.reducer.alpha_head, z).softmax(-1)
            x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
            if seed is None:
                eps = torch.randn_like(z)
            else:
                eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + STRIDE * i))
            x = torch.cat([x[:, :1], x[:, 1:] + beta * (1 - alpha)[..., None] * eps], dim=1)
        x = vit_block(blk, x)
    return vit_head(model, x)


def test_eval_matches_naive_and_keeps_137_96_67():
    model = with_tnt(deit())
    images = sample_images()
    with torch.no_grad():
        out = model(images)
        plan = {b: (int(196 * RATE ** (s + 1)), 25, "alpha") for s, b in enumerate(BLOCKS)}
        ref, kept, margin = naive_eval(model, images, plan)
    assert margin > 1e-5  # no near-ties in α or in the similarity ranking
    records = td.last_reduction(model).records
    assert [r.kept for r in records] == [137, 96, 67] == [k.shape[1] for k in kept]
    assert td.expected_patch_tokens(model, training=False) == [137, 96, 67]
    for rec, k in zip(records, kept):
        assert torch.equal(rec.source, k)  # same tokens, in descending α
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # the similarity step matters: top-k by α alone keeps other tokens
        _, topk_only, _ = naive_eval(model, images, {b: (k, 0, "alpha") for b, (k, _, _) in plan.items()})
    assert not torch.equal(topk_only[0], kept[0])


@pytest.mark.parametrize("seed", [0, None])
def test_training_adds_noise_as_naive(seed):
    model = with_tnt(deit(), seed=seed).train()
    images = sample_images()
    torch.manual_seed(7)
    with torch.no_grad():
        out = model(images)
    assert [r.kept for r in td.last_reduction(model).records] == [196, 196, 196]  # nothing dropped in training
    assert td.aux_loss(model) == 0.0  # cross-entropy only
    torch.manual_seed(7)
    with torch.no_grad():
        ref = naive_train(model, images, BLOCKS, seed)
        quiet = naive_train(model, images, BLOCKS, seed, beta=0.0)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert (out - quiet).abs().max() > 1e-3  # the noise matters: the test can fail


def test_training_step_trains_only_the_heads():
    model = with_tnt(deit()).train()
    groups = param_groups(model, weight_decay=0.05, trainable="reducer")  # the trainer's optim.trainable=reducer
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for h in heads(model).values() for p in h.parameters()}
    loss = F.cross_entropy(model(sample_images()), torch.tensor([1, 7]))
    loss.backward()
    for head in heads(model).values():
        assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.blocks[0].parameters())


def test_when_train_leaves_evaluation_unchanged():
    model = deit()
    images = sample_images()
    with torch.no_grad():
        plain = model(images)
        with_tnt(model, when="train")
        assert torch.equal(model(images), plain)


def test_parameters_save_and_load():
    def plain_tnt():
        return td.attach(deit(), lambda f: td.reducer("tnt", dim=f.dim), blocks=BLOCKS, schedule=td.Constant(RATE),
                         relative_to="original", when="always")

    model = with_tnt(deit())
    state = model.state_dict()
    assert "blocks.6.token_site.reducer.alpha_head.weight" in state
    other = plain_tnt()
    other.load_state_dict(state)
    images = sample_images()
    with torch.no_grad():  # fresh models: both sites' generators start from their seeds
        out = model(images)
        torch.testing.assert_close(other(images), out, atol=0, rtol=0)
        assert (plain_tnt()(images) - out).abs().max() > 1e-4  # unloaded heads choose differently


def test_attach_tnt_single_layer_protocol():
    model = widen_heads(attach_tnt(deit(), prune_after=(2,), keep_rate=0.5))
    assert [(s.block, s.when) for s in td.sites(model)] == [(1, "train"), (2, "train"), (3, "always"), (4, "train"),
                                                            (5, "train")]
    images = sample_images()
    with torch.no_grad():
        out = model(images)
        ref, kept, margin = naive_eval(model, images, {3: (98, 25, "alpha")})
    assert margin > 1e-5
    assert [r.kept for r in td.last_reduction(model).records] == [98]
    assert torch.equal(td.last_reduction(model).records[0].source, kept[0])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    model.train()
    with torch.no_grad():
        model(images)
    assert [(r.block, r.kept) for r in td.last_reduction(model).records] == [(b, 196) for b in range(1, 6)]


def test_attach_tnt_multi_layer_protocol():
    model = widen_heads(attach_tnt(deit(), prune_after=(2, 3, 4), keep_rate=0.8))
    assert [(s.block, s.when) for s in td.sites(model)] == [(0, "eval"), (1, "train"), (2, "train"), (3, "always"),
                                                            (4, "always"), (5, "always")]
    images = sample_images()
    with torch.no_grad():
        out = model(images)
        plan = {0: (156, 40, "random"), 3: (124, 0, "alpha"), 4: (99, 0, "alpha"), 5: (79, 0, "alpha")}
        ref, kept, margin = naive_eval(model, images, plan)
    assert margin > 1e-5
    records = td.last_reduction(model).records
    assert [r.kept for r in records] == [156, 124, 99, 79]
    assert all(torch.equal(r.source, k) for r, k in zip(records, kept))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_defaults_and_init():
    red = td.reducer("tnt", dim=192)
    assert (red.default_position, red.similarity, red.beta, red.alpha_norm, red.seed) == ("before", 25, 0.02, True, 0)
    w, b = red.alpha_head.weight, red.alpha_head.bias
    assert w.shape == (1, 192) and b.abs().max() == 0 and 0.015 < w.std() < 0.025 and w.abs().max() <= 2.0
    assert list(td.reducer("tnt", importance="random", dim=None).parameters()) == []
    assert callable(td.reducer("tnt")) and not isinstance(td.reducer("tnt"), td.Reducer)  # dim from each site


@pytest.mark.parametrize("kwargs, name", [
    ({"dim": 0}, "dim"), ({"dim": 192, "importance": "cls"}, "importance"), ({"dim": 192, "similarity": -1}, "similarity"),
    ({"dim": 192, "beta": -0.1}, "beta"), ({"dim": 192, "alpha_norm": "yes"}, "alpha_norm"),
    ({"dim": 192, "seed": -2}, "seed"), ({"dim": 192, "noise": 0.1}, "reducer_args"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        td.reducer("tnt", **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"prune_after": (11,)}, "prune_after"), ({"prune_after": ()}, "prune_after"), ({"noise_after": (2, 2)}, "noise_after"),
    ({"keep_rate": [0.5, 0.5]}, "keep_rate"), ({"keep_rate": 1.5}, "keep_rate"), ({"mode": "both"}, "mode"),
])
def test_attach_tnt_bad_arguments(kwargs, name):
    model = deit()
    with pytest.raises(ValueError, match=f"^{name}: "):
        attach_tnt(model, **kwargs)
    assert td.sites(model) == []  # nothing attached on failure


def test_similarity_step_is_capped_and_checked():
    torch.manual_seed(0)
    z, importance = torch.randn(2, 30, 8), torch.rand(2, 30)
    gen = torch.Generator().manual_seed(1)
    idx = prune_indices(importance, z, keep=10, similarity=25, gen=gen)  # s capped to keep: 20 candidates
    assert idx.shape == (2, 10)
    ref, _ = naive_similarity_prune(importance, z, 10, 10, torch.Generator().manual_seed(1))
    assert torch.equal(idx, ref)
    with pytest.raises(ValueError, match="^r: "):
        random_sim_prune(importance, z, r=16)
