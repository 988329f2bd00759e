"""Training pieces for the zoo: parameter groups, pretrained starts, distillation."""

import math

import pytest
import torch
from torch import nn

import tokendrop as td
from tokendrop.models.pretrained import PretrainedError, load_pretrained
from tokendrop.train.distill import distill_kl
from tokendrop.train.optim import group_lr_factor, param_groups, parameter_role


class Learned(td.Reducer):
    """A learned test reducer: scores tokens with a Linear, keeps the top k."""

    def __init__(self, dim=96):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x, keep, inputs):
        s = self.score(x[:, inputs.state.num_prefix:]).squeeze(-1)
        idx = s.topk(keep, dim=1).indices
        out = inputs.state.select(x, idx)
        gate = torch.gather(s, 1, idx).sigmoid().unsqueeze(-1)  # let the score get gradient
        return torch.cat([out[:, :1], out[:, 1:] * gate], dim=1)


def tiny(**kw):
    return td.build_model("hybrid_vit_tiny", num_classes=10, drop_rate=0.0, drop_path_rate=0.0, **kw)


def test_parameter_roles_and_groups():
    model = tiny()
    td.attach(model, Learned(), blocks=[1], schedule=td.Constant(0.5), when="always")
    assert parameter_role("blocks.1.token_site.reducer.score.weight") == "reducer"
    assert parameter_role("head.weight") == "new" and parameter_role("patch_embed.proj.0.weight") == "new"
    assert parameter_role("blocks.0.attn.qkv.weight") == "backbone"
    groups = param_groups(model, 0.05, reducer_lr_scale=10.0, backbone_lr_scale=0.1, backbone_freeze_epochs=2)
    by_role = {}
    for g in groups:
        by_role.setdefault(g["role"], []).append(g)
    assert {g["lr_scale"] for g in by_role["reducer"]} == {10.0}
    assert {g["lr_scale"] for g in by_role["backbone"]} == {0.1}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert (g["weight_decay"] == 0.0) == (p.ndim <= 1 or n.endswith(("pos_embed", "cls_token")))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    backbone = by_role["backbone"][0]
    assert group_lr_factor(backbone, 0.5, epoch=1.9) == 0.0 and group_lr_factor(backbone, 0.5, epoch=2) == 0.05
    assert group_lr_factor(by_role["reducer"][0], 0.5, epoch=0) == 5.0


def test_trainable_reducer_only():
    model = tiny()
    td.attach(model, Learned(), blocks=[1], schedule=td.Constant(0.5), when="always")
    groups = param_groups(model, 0.05, trainable="reducer")
    assert {g["role"] for g in groups} == {"reducer"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "blocks.1.token_site.reducer.score.weight", "blocks.1.token_site.reducer.score.bias"]
    with pytest.raises(ValueError, match="no parameter is left"):
        param_groups(tiny(), 0.05, trainable="reducer")
    with pytest.raises(ValueError, match="optim.trainable"):
        param_groups(tiny(), 0.05, trainable="head")


def test_pretrained_adapts_head_grid_and_channels(tmp_path):
    src = tiny()
    torch.save({"model": src.state_dict(), "config": {}}, tmp_path / "ckpt.pt")
    dst = td.build_model("hybrid_vit_tiny", num_classes=5, in_chans=1, img_size=28)
    td.attach(dst, Learned(), blocks=[2], schedule=td.Constant(0.5))
    report = load_pretrained(dst, str(tmp_path / "ckpt.pt"))
    assert report.skipped == ["head.weight", "head.bias"]
    assert any("pos_embed 8x8 -> 7x7" in a for a in report.adapted)
    assert any("input channels 3 -> 1" in a for a in report.adapted)
    torch.testing.assert_close(dst.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    torch.testing.assert_close(dst.patch_embed.proj[0].weight, src.patch_embed.proj[0].weight.sum(1, keepdim=True))
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained(dst, str(tmp_path / "missing.pt"))
    torch.save({"model": td.build_model("hybrid_vit_ptd").state_dict()}, tmp_path / "other.pt")
    with pytest.raises(PretrainedError, match="model.pretrained: .* shape"):
        load_pretrained(dst, str(tmp_path / "other.pt"))


def test_distill_kl_matches_formula():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    for T in (1.0, 2.0):
        ps, pt = (s / T).softmax(-1), (t / T).softmax(-1)
        ref = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
        assert math.isclose(distill_kl(s, t, T).item(), ref.item(), rel_tol=1e-5)
    assert distill_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
