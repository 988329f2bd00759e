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


# ------------------------------------------------------------------------- through the trainer
FAST = ["data.dataset=digits", "data.train_subset=128", "data.val_subset=100", "data.workers=0", "optim.batch_size=64",
        "optim.eval_batch_size=100", "optim.warmup_epochs=0", "run.threads=1", "ema.enabled=false",
        "run.device=cpu"]


def run_cli(out, *items, config="fashion_mnist_baseline"):
    from tokendrop.cli import main

    args = ["train", "--config", config, "--out", str(out), "--no-progress"]
    for item in (*FAST, *items):
        args += ["--set", item]
    return main(args)


@pytest.fixture()
def learned_registered():
    from tokendrop.reduction.registry import _REDUCERS

    td.register_reducer("test_learned")(Learned)
    yield "test_learned"
    _REDUCERS.pop("test_learned")


def backbone_state(sd):
    return {k: v for k, v in sd.items() if k.startswith(("blocks.", "norm.", "cls_token")) and ".token_site." not in k}


def test_finetune_from_checkpoint_with_frozen_backbone(tmp_path, learned_registered):
    assert run_cli(tmp_path / "base", "optim.epochs=1") == 0
    base = torch.load(tmp_path / "base" / "last.pt", weights_only=False)["model"]
    code = run_cli(tmp_path / "ft", "optim.epochs=1", f"model.pretrained={tmp_path / 'base' / 'last.pt'}",
                   "token_drop.enabled=true", f"token_drop.reducer={learned_registered}", "token_drop.when=always",
                   "token_drop.schedule=constant", "token_drop.keep_rate=0.5", "token_drop.blocks=[1]",
                   "optim.backbone_freeze_epochs=1", "optim.reducer_lr_scale=10", "optim.lr=1e-3")
    assert code == 0
    ckpt = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)
    ft = ckpt["model"]
    for k, v in backbone_state(base).items():  # started from the checkpoint, and frozen for the only epoch
        assert torch.equal(ft[k], v), k
    assert not torch.equal(ft["head.weight"], base["head.weight"])  # the head trains
    # the reducer's LR is 10× the schedule's; the backbone's is 0 during the freeze
    groups = ckpt["optimizer"]["param_groups"]
    by_role = {g["role"]: g for g in groups}
    assert by_role["reducer"]["lr_scale"] == 10.0 and by_role["backbone"]["freeze_epochs"] == 1.0
    names = [n for n in ft if ".token_site." in n]
    assert names == ["blocks.1.token_site.reducer.score.weight", "blocks.1.token_site.reducer.score.bias"]
    # one more epoch, after the freeze: now the backbone moves
    from tokendrop.cli import main

    args = ["train", "--config", str(tmp_path / "ft" / "config.yaml"), "--out", str(tmp_path / "ft"), "--no-progress",
            "--resume", "--set", "optim.epochs=2"]
    assert main(args) == 0
    moved = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    assert all(not torch.equal(moved[k], v) for k, v in backbone_state(base).items() if k.endswith("qkv.weight"))


def test_distillation_and_reducer_errors(tmp_path, capsys):
    assert run_cli(tmp_path / "teacher", "optim.epochs=1") == 0
    teacher = tmp_path / "teacher" / "last.pt"
    assert run_cli(tmp_path / "student", "optim.epochs=1", f"distill.teacher={teacher}", "distill.weight=1.0") == 0
    assert run_cli(tmp_path / "bad", "token_drop.enabled=true", "token_drop.reducer=nope") == 2
    err = capsys.readouterr().err
    assert "token_drop.reducer: unknown method 'nope' (allowed: " in err and "topk" in err
    assert not (tmp_path / "bad").exists()
    assert run_cli(tmp_path / "bad2", "token_drop.enabled=true", "token_drop.reducer_args={scroe: l2}") == 2
    assert "token_drop.reducer_args: topk has no argument 'scroe'" in capsys.readouterr().err


def test_resume_of_a_run_written_before_new_keys_existed():
    from tokendrop.train.config import Config
    from tokendrop.train.trainer import config_differences

    new = Config().to_dict()
    old = Config().to_dict()
    del old["token_drop"]["keep_rate"], old["distill"]
    assert config_differences(old, new) == []
    old["token_drop"]["final"] = 0.5
    assert config_differences(old, new) == ["token_drop.final"]
