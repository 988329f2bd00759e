"""The training step without host round-trips (tokendrop.train.step) against a plain eager step written
out here: per-parameter clipping, AdamW and EMA loops, the losses read after every step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tokendrop as td
from tokendrop import build_model
from tokendrop.train.ema import build_ema
from tokendrop.train.optim import build_adamw, load_optimizer_state
from tokendrop.train.step import TrainStep

LR, BETAS, WD, EPS, CLIP = 2e-3, (0.9, 0.999), 0.05, 1e-8, 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("hybrid_vit_tiny", num_classes=10, in_chans=1, img_size=16, drop_rate=0.0, drop_path_rate=0.0)
    td.attach(model, "topk", blocks=[1], schedule=td.Constant(0.5), when="train")  # CLS-attention Top-K
    return model.train()


class EagerReference:
    """The seeds' step, one tensor at a time: cross-entropy, backward, global-norm clipping, AdamW
    (decoupled weight decay, bias-corrected moments) and the EMA rule of ``warmup``."""

    def __init__(self, model: torch.nn.Module, warmup: str, decay: float) -> None:
        self.model, self.warmup, self.decay = model, warmup, decay
        self.ema = copy.deepcopy(model)
        self.m = [torch.zeros_like(p) for p in model.parameters()]
        self.v = [torch.zeros_like(p) for p in model.parameters()]
        self.t = 0
        self.norms: list[float] = []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        model = self.model
        for p in model.parameters():
            p.grad = None
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
        self.norms.append(norm)
        scale = min(1.0, CLIP / (norm + 1e-6))
        self.t += 1
        with torch.no_grad():
            for p, m, v in zip(model.parameters(), self.m, self.v):
                if p.grad is None:
                    continue
                g = p.grad * scale
                m.mul_(BETAS[0]).add_((1 - BETAS[0]) * g)
                v.mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
                m_hat, v_hat = m / (1 - BETAS[0] ** self.t), v / (1 - BETAS[1] ** self.t)
                p.mul_(1 - LR * WD)
                p.sub_(LR * m_hat / (v_hat.sqrt() + EPS))
            d = min(self.decay, (1 + self.t) / (10 + self.t)) if self.warmup == "torch_ema" else self.decay
            for e, p in zip(self.ema.parameters(), model.parameters()):
                e.copy_(d * e + (1 - d) * p)
            for e, b in zip(self.ema.buffers(), model.buffers()):
                e.copy_(d * e + (1 - d) * b if self.warmup == "none" and b.is_floating_point() else b)
        return loss.item()


@pytest.mark.parametrize("warmup, decay", [("torch_ema", 0.99), ("none", 0.9)])
def test_step_matches_the_eager_reference_for_three_steps(warmup, decay):
    model = tiny_model()
    ref = EagerReference(copy.deepcopy(model), warmup, decay)
    ema = build_ema(model, decay, warmup)
    opt = build_adamw([{"params": list(model.parameters()), "weight_decay": WD}], LR, BETAS, torch.device("cpu"))
    step = TrainStep(model, model, opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"), amp="off", clip_grad=CLIP, ema=ema)
    gen = torch.Generator().manual_seed(1)
    losses, ref_losses, before = [], [], 0.0
    for _ in range(3):
        images, labels = torch.randn(6, 1, 16, 16, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        ref_losses.append(ref(images, labels))
        step(images, labels)
        total = step.poll().loss_sum
        losses.append((total - before) / 6)
        before = total
    assert max(ref.norms) > CLIP  # clipping acted
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert len(set(ref_losses)) == 3  # the parameters moved between steps
    for (name, p), q in zip(model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(ema.module.state_dict().items(), ref.ema.state_dict().values()):
        torch.testing.assert_close(a[1], b, rtol=1e-4, atol=1e-6, msg=a[0])
    assert any(not torch.equal(e, p) for e, p in zip(ema.module.parameters(), model.parameters()))  # averaged
    totals = step.poll()
    assert (totals.seen, totals.first_bad) == (18, -1)


def test_step_flags_the_first_non_finite_step_without_raising():
    model = tiny_model()
    opt = build_adamw([{"params": list(model.parameters()), "weight_decay": WD}], LR, BETAS, torch.device("cpu"))
    step = TrainStep(model, model, opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"), amp="off")
    images, labels = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    step(images, labels)
    step(images * float("nan"), labels)
    step(images, labels)
    assert step.poll().first_bad == 1
    step.reset()
    assert step.poll().first_bad == -1


def test_optimizer_state_keeps_this_devices_kernel():
    p = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.AdamW([p], lr=0.1, foreach=True)  # as written where AdamW has no fused kernel
    p.grad = torch.ones(3)
    saved.step()
    opt = build_adamw([{"params": [p]}], 0.1, (0.9, 0.999), torch.device("cpu"))
    load_optimizer_state(opt, saved.state_dict(), torch.device("cpu"))
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (True, False)
    assert float(opt.state[p]["step"]) == 1.0
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0
    # AdamW's two steps by hand (gradient 1, lr 0.1, weight decay 0.01): m = 0.19, v = 0.001999 at step 2
    p1 = 1.0 * (1 - 0.1 * 0.01) - 0.1 * 1.0 / (1.0 + 1e-8)
    m_hat, v_hat = 0.19 / (1 - 0.9 ** 2), 0.001999 / (1 - 0.999 ** 2)
    expected = p1 * (1 - 0.1 * 0.01) - 0.1 * m_hat / (v_hat ** 0.5 + 1e-8)
    torch.testing.assert_close(p.detach(), torch.full((3,), expected), atol=1e-6, rtol=0)
