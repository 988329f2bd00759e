import copy

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import tokendrop as td

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
VARIANTS = {
    "vit": lambda: VisionTransformer(**SMALL),
    "deit_distilled": lambda: VisionTransformerDistilled(**SMALL),
    "layerscale_qknorm_registers": lambda: VisionTransformer(**SMALL, init_values=0.1, qk_norm=True, reg_tokens=4),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keep_rate_one_is_identity(name):
    torch.manual_seed(0)
    model = VARIANTS[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        td.attach(model, td.TopK(), blocks=[0, 2], schedule=td.Constant(1.0), when="always")
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_half_keep_rate_keeps_prefix_tokens(name):
    torch.manual_seed(0)
    model = VARIANTS[name]().eval()
    reference = copy.deepcopy(model)
    prefix = model.num_prefix_tokens
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    reference.blocks[1].register_forward_hook(lambda m, a, o: outs.__setitem__("ref", o))
    model.blocks[1].register_forward_hook(lambda m, a, o: outs.__setitem__("cut", o))
    td.attach(model, td.TopK(), blocks=[1], schedule=td.Constant(0.5), when="always")
    with torch.no_grad():
        reference(x)
        logits = model(x)
    assert logits.shape == (2, 10)
    assert outs["cut"].shape[1] == prefix + 32
    # every prefix token survives, and (attention over all tokens, MLP per token) is unchanged
    torch.testing.assert_close(outs["cut"][:, :prefix], outs["ref"][:, :prefix], atol=1e-5, rtol=1e-5)
    rec = td.last_reduction(model).records[0]
    assert rec.kept == 32 and rec.source.max() < 64


def test_distilled_deit_train_mode_returns_both_heads():
    model = VisionTransformerDistilled(**SMALL).train()
    model.set_distilled_training(True)
    td.attach(model, td.TopK(), blocks=[0], schedule=td.Constant(0.7))
    out, out_dist = model(torch.randn(2, 3, 32, 32))
    assert out.shape == out_dist.shape == (2, 10)


def test_non_vit_is_rejected():
    with pytest.raises(TypeError, match="ViT"):
        td.attach(torch.nn.Linear(3, 3), td.TopK())
