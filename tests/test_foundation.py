"""The zoo foundation: one token state through every block, masks, per-image counts, sizes, provenance,
output counts, per-site factories and the method registry — each against an independent computation."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokendrop as td
from tokendrop.bench.flops import attached_macs, count_macs
from tokendrop.reduction.registry import _REDUCERS


def small_vit(depth=6):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, num_classes=5,
                             qkv_bias=True).eval()


class PairMerge(td.Reducer):
    """Test reducer: merge patch tokens (2j, 2j+1) into token j (size-weighted average)."""

    def output_count(self, n_in, keep):
        return n_in // 2

    def forward(self, x, keep, inputs):
        n = x.shape[1] - inputs.state.num_prefix
        dst = (torch.arange(n) // 2).expand(x.shape[0], n)
        return inputs.state.merge(x, dst, n // 2)


class PadLast(td.Reducer):
    """Test reducer: keep every token, but in image 1 mark the last ``pad`` slots as padding."""

    def __init__(self, pad=3):
        super().__init__()
        self.pad = pad

    def output_count(self, n_in, keep):
        return n_in

    def forward(self, x, keep, inputs):
        B, n = x.shape[0], x.shape[1] - inputs.state.num_prefix
        idx = torch.arange(n).expand(B, n)
        valid = torch.ones(B, n, dtype=torch.bool)
        valid[1, n - self.pad:] = False
        return inputs.state.select(x, idx, valid)


class FirstK(td.Reducer):
    def forward(self, x, keep, inputs):
        return inputs.state.select(x, torch.arange(keep).expand(x.shape[0], keep))


class TopKPlusFused(td.Reducer):
    """Test reducer shaped like EViT: top-k by CLS attention plus one token averaging the rest."""

    needs = frozenset({"cls_attention"})

    def output_count(self, n_in, keep):
        return keep + 1 if keep < n_in else n_in

    def forward(self, x, keep, inputs):
        order = inputs.cls_attention.argsort(dim=1, descending=True)
        dst = torch.empty_like(order)
        ranks = torch.arange(order.shape[1]).expand_as(order).clamp_max(keep)
        dst.scatter_(1, order, ranks)
        return inputs.state.merge(x, dst, keep + 1)


def block_naive(block, x, bias):
    """One pre-norm timm block with an explicit attention matrix and an additive per-key logit bias."""
    a = block.attn
    B, T, C = x.shape
    H, D = a.num_heads, C // a.num_heads
    y = block.norm1(x)
    q, k, v = (y @ a.qkv.weight.T + a.qkv.bias).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / D ** 0.5 + bias[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ a.proj.weight.T + a.proj.bias
    x = x + out
    return x, (lambda z: z + block.mlp(block.norm2(z)))


def test_size_bias_reaches_every_later_block():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # naive: merge pairs after block 3's attention residual; blocks 4+ add log(2) to every patch key
        x = model._pos_embed(model.patch_embed(images))
        bias = torch.zeros(2, x.shape[1])
        for i, block in enumerate(model.blocks):
            x, mlp = block_naive(block, x, bias)
            if i == 3:
                cls, patches = x[:, :1], x[:, 1:]
                x = torch.cat([cls, 0.5 * (patches[:, 0::2] + patches[:, 1::2])], dim=1)
                bias = torch.cat([torch.zeros(2, 1), torch.full((2, patches.shape[1] // 2), 2.0).log()], dim=1)
            x = mlp(x)
        ref = model.head(model.norm(x)[:, 0])
        td.attach(model, PairMerge(), blocks=[3], schedule=td.Constant(0.5), when="always")
        out = model(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    rec = td.last_reduction(model).records[0]
    assert rec.size.sum(dim=1).tolist() == [16.0, 16.0]  # sizes sum to P
    assert rec.assignment.tolist() == [[p // 2 for p in range(16)]] * 2
    # and without the size bias the later blocks would differ: the test can fail
    td.last_reduction(model).size = None
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        for i, block in enumerate(model.blocks):
            x, mlp = block_naive(block, x, torch.zeros(2, x.shape[1]))
            if i == 3:
                x = torch.cat([x[:, :1], 0.5 * (x[:, 1::2] + x[:, 2::2])], dim=1)
            x = mlp(x)
    assert (model.head(model.norm(x)[:, 0]) - out).abs().max() > 1e-4


def test_masked_equals_removed_at_the_site_and_in_later_blocks():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    td.attach(model, PadLast(3), blocks=[1], schedule=td.Constant(0.5), when="always")
    with torch.no_grad():
        padded = model(images)
    rec = td.last_reduction(model).records[0]
    assert rec.kept == 16 and rec.kept_per_image.tolist() == [16, 13]
    assert (rec.assignment[1, 13:] == -1).all() and (rec.assignment[0] >= 0).all()
    td.detach(model)
    td.attach(model, FirstK(), blocks=[1], schedule=td.Constant(13 / 16), when="always")
    with torch.no_grad():
        removed = model(images[1:])
    torch.testing.assert_close(padded[1:], removed, atol=1e-5, rtol=1e-5)
    td.detach(model)
    with torch.no_grad():
        full = model(images)
    torch.testing.assert_close(padded[:1], full[:1], atol=1e-5, rtol=1e-5)  # image 0 kept everything
    assert (padded[1] - full[1]).abs().max() > 1e-4


def test_output_count_drives_expected_tokens_and_macs():
    model = small_vit()
    td.attach(model, TopKPlusFused(), blocks=[1], schedule=td.Constant(0.5), when="always")
    assert td.expected_patch_tokens(model) == [9]
    x = torch.randn(1, 3, 32, 32)
    cls_row = 3 * 17 * 16  # the saliency q_cls·Kᵀ the site computes: heads × tokens × head width
    assert attached_macs(model, 32, overhead=False) + cls_row == count_macs(model, x)
    assert attached_macs(model, 32) == count_macs(model, x)
    assert td.last_reduction(model).records[0].kept == 9
    # the fused token carries every patch the top-k dropped
    rec = td.last_reduction(model).records[0]
    assert (rec.assignment == 8).sum().item() == 8 and rec.size[0, 8].item() == 8


def test_before_site_is_counted_in_its_block():
    model = small_vit()
    td.attach(model, FirstK(), blocks=[2], schedule=td.Constant(0.5), when="always", position="before")
    x = torch.randn(1, 3, 32, 32)
    assert attached_macs(model, 32) == count_macs(model, x)
    td.detach(model)
    td.attach(model, FirstK(), blocks=[2], schedule=td.Constant(0.5), when="always", position="inside")
    assert attached_macs(model, 32) == count_macs(model, x)
    assert td.TopK("l2").default_position == "before" and td.TopK("cls_attention").default_position == "inside"


def test_topk_assignment_agrees_with_source():
    model = small_vit()
    td.attach(model, td.TopK("cls_attention"), blocks=[1, 3], schedule=td.Constant(0.5), when="always")
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    for rec in td.last_reduction(model).records:
        for b in range(3):
            src = rec.source[b].tolist()
            assert [rec.assignment[b, p].item() for p in src] == list(range(rec.kept))
            assert (rec.assignment[b] >= 0).sum().item() == rec.kept


def test_merge_after_pruning_composes_assignment():
    model = small_vit()
    td.attach(model, FirstK(), blocks=[1], schedule=td.Constant(0.5), when="always")
    td.attach(model, PairMerge(), blocks=[2], schedule=td.Constant(0.5), when="always")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    rec = td.last_reduction(model).records[1]
    expect = [p // 2 if p < 8 else -1 for p in range(16)]
    assert rec.assignment.tolist() == [expect] * 2
    assert rec.source.tolist() == [[0, 2, 4, 6]] * 2  # smallest member patch


def test_inactive_site_keeps_the_original_forward_and_detach_restores():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    classes = [type(b) for b in model.blocks]
    td.attach(model, td.TopK(), blocks=[2], schedule=td.Constant(0.5), when="train")
    assert all(isinstance(b, td.reduction.site.ReducingBlock) for b in model.blocks)  # every block carries the state
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    td.detach(model)
    assert [type(b) for b in model.blocks] == classes
    assert not any(hasattr(b, "token_block") for b in model.blocks)


def test_factory_receives_site_facts():
    model = small_vit()
    seen = []

    def factory(facts):
        seen.append(facts)
        return td.TopK()

    td.attach(model, factory, blocks=[3, 1], schedule=td.Constant(0.5), when="always")
    assert seen == [td.SiteFacts(block=1, dim=48, num_heads=3, tokens_in=16, keep=8),
                    td.SiteFacts(block=3, dim=48, num_heads=3, tokens_in=8, keep=4)]
    td.attach(model, factory, blocks=[4], schedule=td.Constant(0.7), when="always", relative_to="original")
    assert seen[-1] == td.SiteFacts(block=4, dim=48, num_heads=3, tokens_in=4, keep=int(16 * 0.5 * 0.5 * 0.7))


def test_registry_names_methods_and_rejects_unknowns():
    assert "topk" in td.REDUCERS and isinstance(td.REDUCERS, tuple)
    assert isinstance(td.reducer("topk", score="l2"), td.TopK)
    with pytest.raises(ValueError, match=r"unknown method 'nope' \(allowed: .*topk"):
        td.reducer("nope")
    with pytest.raises(ValueError, match=r"no argument 'scroe' \(allowed: score\)"):
        td.reducer("topk", scroe="l2")

    @td.register_reducer("test_first_k")
    class Registered(FirstK):
        pass

    try:
        assert "test_first_k" in td.REDUCERS
        model = small_vit()
        td.attach(model, "test_first_k", blocks=[0], schedule=td.Constant(0.5), when="always")
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert td.last_reduction(model).records[0].kept == 8
    finally:
        _REDUCERS.pop("test_first_k")


def test_placement_errors_name_the_argument_and_roll_back():
    model = small_vit()
    with pytest.raises(ValueError, match="position: 'before' has no attention"):
        td.attach(model, td.TopK("cls_attention"), blocks=[1], position="before")
    assert td.sites(model) == [] and not any(hasattr(b, "token_site") for b in model.blocks)

    class NeedsPrevious(FirstK):
        needs = frozenset({"prev_attention_colsum"})

    with pytest.raises(ValueError, match="blocks: .*block 0 has none"):
        td.attach(model, NeedsPrevious(), blocks=[2, 0])
    assert td.sites(model) == []


def test_prev_attention_colsum_reaches_the_next_site():
    model = small_vit()
    got = {}

    class Colsum(FirstK):
        needs = frozenset({"prev_attention_colsum"})
        default_position = "before"

        def forward(self, x, keep, inputs):
            got["colsum"] = inputs.prev_attention_colsum
            return super().forward(x, keep, inputs)

    td.attach(model, Colsum(), blocks=[2], schedule=td.Constant(0.5), when="always")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
        x = model._pos_embed(model.patch_embed(images))
        x = model.blocks[0](x)  # still patched: index 0 starts a new state
        b1 = model.blocks[1]
        y = b1.norm1(x)
        B, T, C = y.shape
        q, k, v = (y @ b1.attn.qkv.weight.T + b1.attn.qkv.bias).reshape(B, T, 3, 3, 16).permute(2, 0, 3, 1, 4)
        A = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
    torch.testing.assert_close(got["colsum"], A.sum(dim=(1, 2))[:, 1:], atol=1e-4, rtol=1e-5)


def test_remove_schedule_removes_a_count():
    model = small_vit()
    td.attach(model, FirstK(), blocks=[1, 2, 3], schedule=td.Remove(5), when="always")
    assert td.expected_patch_tokens(model) == [11, 6, 1]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [r.kept for r in td.last_reduction(model).records] == [11, 6, 1]
    decreasing = td.Remove([4, 2])
    assert [decreasing.keep(16, e) for e in (0, 1, 7)] == [12, 14, 14]
    with pytest.raises(ValueError, match="r: "):
        td.Remove(-1)


def test_size_bias_can_be_turned_off_and_begin_forward_runs_first():
    model = small_vit()
    calls = []

    class NoBias(PairMerge):
        def begin_forward(self, state, x, training):
            calls.append((x.shape, training))
            state.size_bias = False

    td.attach(model, NoBias(), blocks=[3], schedule=td.Constant(0.5), when="always")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        x = model._pos_embed(model.patch_embed(images))
        for i, block in enumerate(model.blocks):
            x, mlp = block_naive(block, x, torch.zeros(2, x.shape[1]))
            if i == 3:
                x = torch.cat([x[:, :1], 0.5 * (x[:, 1::2] + x[:, 2::2])], dim=1)
            x = mlp(x)
    torch.testing.assert_close(out, model.head(model.norm(x)[:, 0]), atol=1e-5, rtol=1e-5)
    assert calls == [(torch.Size([2, 17, 48]), False)]


def test_whole_attention_input():
    model = small_vit()
    got = {}

    class Whole(FirstK):
        needs = frozenset({"attention"})

        def forward(self, x, keep, inputs):
            got["A"] = inputs.attention
            return super().forward(x, keep, inputs)

    td.attach(model, Whole(), blocks=[0], schedule=td.Constant(0.5), when="always")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(images)
        x = model._pos_embed(model.patch_embed(images))
        y = model.blocks[0].norm1(x)
        a = model.blocks[0].attn
        q, k, v = (y @ a.qkv.weight.T + a.qkv.bias).reshape(1, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(got["A"], (q @ k.transpose(-1, -2) / 4.0).softmax(-1), atol=1e-5, rtol=1e-5)


def test_registry_builds_site_dependent_methods_per_site():
    class Sized(FirstK):
        def __init__(self, dim, keep, scale=1.0):
            super().__init__()
            self.dim, self.k, self.scale = dim, keep, scale

    td.register_reducer("test_sized")(Sized)
    try:
        factory = td.reducer("test_sized", scale=2.0)
        assert not isinstance(factory, td.Reducer) and callable(factory)
        model = small_vit()
        td.attach(model, "test_sized", blocks=[1, 3], schedule=td.Constant(0.5), when="always")
        made = [s.reducer for s in td.sites(model)]
        assert [(r.dim, r.k, r.scale) for r in made] == [(48, 8, 1.0), (48, 4, 1.0)]
        fixed = td.reducer("test_sized", dim=7, keep=3)
        assert isinstance(fixed, Sized) and fixed.dim == 7
    finally:
        _REDUCERS.pop("test_sized")


def test_method_overhead_macs_match_the_counter():
    """ToMe's matching scores are a matmul FlopCounterMode sees: the analytic count with the method's
    extra_macs equals the measured one; without it, it falls short by exactly the hand formula."""
    model = small_vit()
    td.attach(model, "tome", blocks=[1, 3], schedule=td.Remove(4), when="always")
    x = torch.randn(1, 3, 32, 32)
    scores = (16 // 2) * (16 - 16 // 2) * 16 + (12 // 2) * (12 - 12 // 2) * 16  # |A|·|B|·head width, per site
    assert attached_macs(model, 32) == count_macs(model, x)
    assert attached_macs(model, 32, overhead=False) + scores == count_macs(model, x)


def test_new_sites_take_the_model_mode_and_scratch_is_per_forward():
    seen = []

    class Counting(FirstK):
        def begin_forward(self, state, x, training):
            state.scratch["counting"] = state.scratch.get("counting", 0) + 1

        def forward(self, x, keep, inputs):
            seen.append((self.training, inputs.state.scratch["counting"]))
            return super().forward(x, keep, inputs)

    model = small_vit()  # in eval mode
    td.attach(model, Counting(), blocks=[1, 3], schedule=td.Constant(0.5), when="always")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    assert seen == [(False, 2)] * 4  # eval sites; two sites counted afresh in each forward
    trained = small_vit().train()
    td.attach(trained, FirstK(), blocks=[2], schedule=td.Constant(0.5))
    assert td.sites(trained)[0].training and td.sites(trained)[0].reducer.training
