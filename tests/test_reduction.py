import copy

import pytest
import torch

import tokendrop as td


def tiny(**kw):
    kw.setdefault("drop_rate", 0.0)
    kw.setdefault("drop_path_rate", 0.0)
    return td.build_model("hybrid_vit_tiny", num_classes=10, **kw)


def test_backbone_shapes_and_names():
    ptd = td.build_model("hybrid_vit_ptd", num_classes=100)
    assert ptd.patch_embed.num_patches == 256 and ptd.pos_embed.shape == (1, 257, 192)
    assert len(ptd.blocks) == 6 and ptd.blocks[0].attn.num_heads == 6 and ptd.blocks[0].attn.qkv.bias is None
    assert ptd.blocks[0].mlp.fc1.out_features == 768
    ctd = td.build_model("hybrid_vit_ctd", num_classes=100)
    assert ctd.patch_embed.num_patches == 64 and ctd.pos_embed.shape == (1, 65, 384) and len(ctd.blocks) == 8
    keys = set(ptd.state_dict())
    for k in ("cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
              "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight", "head.weight"):
        assert k in keys
    assert all(k.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.", "head.")) for k in keys)
    gray = td.build_model("hybrid_vit_tiny", num_classes=10, in_chans=1, img_size=28)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10) and gray.patch_embed.num_patches == 49
    with pytest.raises(ValueError, match="img_size"):
        td.build_model("hybrid_vit_ptd", img_size=33)
    with pytest.raises(ValueError, match="name: unknown model"):
        td.build_model("no_such_vit")


def test_timm_registration():
    import timm

    m = timm.create_model("hybrid_vit_ptd", num_classes=100)
    assert m.head.out_features == 100


def test_drop_path_rises_linearly():
    m = td.build_model("hybrid_vit_ptd", drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.1 * i / 5 for i in range(6)])


def test_kept_tokens_are_the_top_k_originals():
    torch.manual_seed(3)
    model = tiny().train()
    td.attach(model, td.TopK("cls_attention"), blocks=[1], schedule=td.Constant(0.5))
    captured = {}
    model.blocks[1].mlp.register_forward_pre_hook(lambda m, a: captured.__setitem__("mlp_in", a[0]))
    model.blocks[1].norm2.register_forward_pre_hook(lambda m, a: captured.__setitem__("y", a[0]))
    model.blocks[0].register_forward_hook(lambda m, a, o: captured.__setitem__("x1", o))
    x = torch.randn(3, 3, 32, 32)
    model(x)
    rec = td.last_reduction(model).records[0]
    assert (rec.tokens_in, rec.kept) == (64, 32)
    # naive loop reference: recompute block 1's residual stream and CLS attention explicitly
    blk = model.blocks[1]
    x1 = captured["x1"]
    with torch.no_grad():
        h = blk.norm1(x1)
        B, T, C = h.shape
        q, k, v = (h @ blk.attn.qkv.weight.T).reshape(B, T, 3, 3, C // 3).permute(2, 0, 3, 1, 4)
        A = (q @ k.transpose(-1, -2) / (C // 3) ** 0.5).softmax(-1)
        y_full = x1 + blk.attn.proj((A @ v).transpose(1, 2).reshape(B, T, C))
        sal = A.mean(1)[:, 0, 1:]
        for b in range(B):
            order = sorted(range(64), key=lambda i: -float(sal[b, i]))[:32]
            assert rec.source[b].tolist() == order
            expected = torch.stack([y_full[b, 0]] + [y_full[b, 1 + i] for i in order])
            torch.testing.assert_close(captured["y"][b], expected, atol=1e-5, rtol=1e-5)


def test_eval_identical_to_unpatched_when_train_only():
    torch.manual_seed(4)
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    td.attach(model, td.TopK(), blocks=[0, 2], schedule=td.Constant(0.3), when="train")
    td.set_epoch(model, 10)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    td.detach(model)
    assert type(model.blocks[0]).__name__ == "Block" and not hasattr(model.blocks[0], "token_site")
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


def test_gradient_reaches_dropped_tokens_only_through_attention():
    torch.manual_seed(5)
    model = tiny().train()
    td.attach(model, td.TopK(), blocks=[0], schedule=td.Constant(0.5))
    grads = {}

    def keep_attn_grad(module, args, out):
        out.register_hook(lambda g: grads.__setitem__("attn", g))

    model.blocks[0].attn.proj.register_forward_hook(keep_attn_grad)

    def keep_input_grad(module, args):
        args[0].register_hook(lambda g: grads.__setitem__("x0", g))

    model.blocks[0].register_forward_pre_hook(keep_input_grad)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    src = td.last_reduction(model).records[0].source
    for b in range(2):
        dropped = sorted(set(range(64)) - set(src[b].tolist()))
        kept = src[b].tolist()
        # the attention output of a dropped token feeds only its residual row: no gradient there
        assert grads["attn"][b, 1 + torch.tensor(dropped)].abs().max() == 0
        assert grads["attn"][b, 1 + torch.tensor(kept)].abs().min() > 0
        # dropped tokens still serve as keys/values of this block's attention
        assert grads["x0"][b, 1 + torch.tensor(dropped)].abs().sum(-1).min() > 0


def test_two_sites_compose():
    torch.manual_seed(6)
    model = tiny().train()
    td.attach(model, td.TopK(), blocks=[0], schedule=td.Constant(0.5))
    td.attach(model, td.TopK("random"), blocks=[2], schedule=td.Constant(0.5))
    sizes = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[1]))
    model(torch.randn(2, 3, 32, 32))
    assert sizes == [65, 33, 33, 17]
    first, second = td.last_reduction(model).records
    assert (first.kept, second.tokens_in, second.kept) == (32, 32, 16)
    for b in range(2):  # the second site keeps a subset of the first site's originals
        assert set(second.source[b].tolist()) <= set(first.source[b].tolist())
    assert td.expected_patch_tokens(model) == [32, 16]
    with pytest.raises(ValueError, match="already has"):
        td.attach(model, td.TopK(), blocks=[2])


def test_relative_to_original_counts():
    model = tiny().train()
    td.attach(model, td.TopK("random"), blocks=[0, 1, 2], schedule=td.Constant(0.5), relative_to="original")
    model(torch.randn(1, 3, 32, 32))
    assert [r.kept for r in td.last_reduction(model).records] == [int(64 * 0.5 ** s) for s in (1, 2, 3)]


def test_curriculum_drives_keep_count():
    model = tiny().train()
    td.attach(model, td.TopK(), blocks=[0], schedule=td.Curriculum(2, 6, final=0.5, gamma=2.0))
    for epoch, kept in [(0, None), (4, int(64 * (1 - 0.125))), (6, 32), (9, 32)]:
        td.set_epoch(model, epoch)
        model(torch.randn(1, 3, 32, 32))
        recs = td.last_reduction(model).records
        assert (recs[0].kept if recs else None) == kept  # d = 0 runs the plain block (reference fall-back)


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks=[4]), r"blocks: index 4 is outside the allowed range \[0, 3\]"),
    (dict(blocks=[-1]), r"blocks: index -1"),
    (dict(blocks=[1, 1]), "twice"),
    (dict(when="sometimes"), "when:"),
    (dict(relative_to="x"), "relative_to:"),
])
def test_bad_attach_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        td.attach(tiny(), td.TopK(), **kwargs)


def test_unknown_score():
    with pytest.raises(ValueError, match=r"score: unknown score 'entropy' \(allowed: cls_attention"):
        td.TopK("entropy")


def test_gradient_saliency_inside_the_block():
    torch.manual_seed(8)
    model = tiny().train()
    reference = copy.deepcopy(model).eval()
    td.attach(model, td.TopK("gradient"), blocks=[1], schedule=td.Constant(0.5))  # the trainer's placement
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss_fn = torch.nn.functional.cross_entropy
    assert td.prepare_step(model, x, y, loss_fn)
    model(x)
    kept = td.last_reduction(model).records[0].source
    store = {}

    def keep_residual(module, args):  # norm2's input is the residual stream after the attention
        args[0].retain_grad()
        store["y"] = args[0]

    reference.blocks[1].norm2.register_forward_pre_hook(keep_residual)
    loss_fn(reference(x), y).backward()
    s = (store["y"].grad * store["y"]).abs().sum(-1)[:, 1:]
    assert torch.equal(kept, s.topk(32, dim=1).indices)


def test_prepare_step_skips_when_nothing_is_dropped():
    model = tiny().train()
    td.attach(model, td.TopK("gradient"), blocks=[0], schedule=td.Curriculum(5, 10, final=0.5))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    td.set_epoch(model, 0)
    assert not td.prepare_step(model, x, y, torch.nn.functional.cross_entropy)
    model(x)  # d = 0: the plain block, no saliency needed
    td.set_epoch(model, 10)
    assert td.prepare_step(model, x, y, torch.nn.functional.cross_entropy)


def test_cls_attention_needs_a_class_token():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        td.attach(vit, td.TopK("cls_attention"))
    td.attach(vit, td.TopK("random"), schedule=td.Constant(0.5), when="always")
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_gradient_saliency_matches_independent_computation():
    torch.manual_seed(7)
    model = tiny().train()
    reference = copy.deepcopy(model).eval()
    td.attach(model, td.TopK("gradient"), blocks=[1], schedule=td.Constant(0.5), position="before")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss_fn = torch.nn.functional.cross_entropy
    bn_before = model.patch_embed.proj[1].running_mean.clone()
    assert td.prepare_step(model, x, y, loss_fn)
    assert model.training and torch.equal(bn_before, model.patch_embed.proj[1].running_mean)
    assert all(p.grad is None for p in model.parameters())
    model(x)
    kept = td.last_reduction(model).records[0].source
    # independent: gradient of the loss w.r.t. block 1's input in the unpatched model
    store = {}

    def keep_output(module, args, out):
        out.retain_grad()
        store["x"] = out

    reference.blocks[0].register_forward_hook(keep_output)
    loss_fn(reference(x), y).backward()
    s = (store["x"].grad * store["x"]).abs().sum(-1)[:, 1:]
    expected = s.topk(32, dim=1).indices
    assert torch.equal(kept, expected)
    with pytest.raises(RuntimeError, match="prepare_step"):  # the saliency is consumed by one forward
        model(x)


RADIAL_COUNTS = {  # seed 004's reference counts on a 14x14 grid (research/zoo-spec.md §11)
    "l1": {0.25: [40, 12, 4], 0.5: [92, 40, 24], 0.7: [136, 92, 68], 0.9: [172, 156, 136]},
    "l2": {0.25: [52, 12, 4], 0.5: [96, 52, 24], 0.7: [140, 96, 68], 0.9: [176, 156, 140]},
    "linf": {0.25: [36, 16, 4], 0.5: [100, 36, 16], 0.7: [144, 100, 64], 0.9: [196, 144, 144]},
}


@pytest.mark.parametrize("score", ["l1", "l2", "linf"])
def test_radial_patterns_match_seed_004_counts(score):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=56, patch_size=4, embed_dim=12, depth=10, num_heads=2, num_classes=3).eval()
    for rate, counts in RADIAL_COUNTS[score].items():
        td.attach(vit, td.TopK(score), blocks=[3, 6, 9], schedule=td.Constant(rate), when="always", relative_to="original")
        with torch.no_grad():
            vit(torch.randn(2, 3, 56, 56))
        recs = td.last_reduction(vit).records
        assert [r.kept for r in recs] == counts
        # every sample keeps the same centred set, and the set is a whole set of rings
        assert torch.equal(recs[-1].source[0].sort().values, recs[-1].source[1].sort().values)
        td.detach(vit)


class _PenalisedKeepAll(td.Reducer):
    """A learned-reducer stand-in: keeps every token and leaves an auxiliary loss."""

    def forward(self, x, keep, inputs):
        self.aux_loss = x[:, inputs.state.num_prefix:].pow(2).mean()
        return x


def test_aux_losses_are_collected_once():
    model = tiny().train()
    td.attach(model, _PenalisedKeepAll(), blocks=[0, 2], schedule=td.Constant(0.5))
    inputs = {}
    for b in (0, 2):
        model.blocks[b].norm2.register_forward_pre_hook(lambda m, a, b=b: inputs.__setitem__(b, a[0]))
    model(torch.randn(2, 3, 32, 32))
    expected = sum(inputs[b][:, 1:].pow(2).mean() for b in (0, 2))
    torch.testing.assert_close(td.aux_loss(model), expected)
    assert td.aux_loss(model) == 0.0
