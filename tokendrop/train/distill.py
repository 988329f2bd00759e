"""Knowledge distillation from a full-token teacher: a KL term on the logits (DynamicViT's official
training, and an option for every reducer trained as a curriculum)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model
from ..models.pretrained import PretrainedError, is_checkpoint_path, load_pretrained


def build_teacher(source: str, model_name: str, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """The teacher, frozen and in eval mode, with no reduction sites: a checkpoint path (built as
    ``model_name``) or a timm model name with its published weights."""
    from .. import reduction as red

    name = model_name if is_checkpoint_path(source) else source
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    teacher = build_model(name, **kwargs)
    report = load_pretrained(teacher, source)
    if report.skipped:
        raise PretrainedError(f"distill.teacher: {source} classifies into another number of classes than the "
                              f"data's {num_classes} (its head does not fit)")
    red.detach(teacher)
    teacher.eval().requires_grad_(False)
    return teacher


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch, in float32."""
    t = temperature
    s_log = F.log_softmax(student_logits.float() / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s_log, t_log, reduction="batchmean", log_target=True) * (t * t)
