"""Time the trainer's training step (tokendrop.train.step.TrainStep: bf16 autocast where it applies,
clipping at 1, fused AdamW, the torch_ema EMA) on the PTD report model at d = 0 and d = 0.35 (Top-K by
CLS attention in block 0), batch 32, on whatever tokendrop is first on the path:
`PYTHONPATH=CHECKOUT python benchmarks/scripts/trainer_step.py`."""
import statistics
import time

import torch

import tokendrop as td
from tokendrop.train.ema import build_ema
from tokendrop.train.optim import build_adamw, param_groups
from tokendrop.train.step import TrainStep

torch.set_num_threads(2)
device = torch.device("cpu")


def step_seconds(drop: float, steps: int = 9) -> float:
    torch.manual_seed(0)
    model = td.build_model("hybrid_vit_ptd", num_classes=100)
    if drop:
        td.attach(model, td.TopK("cls_attention"), blocks=[0], schedule=td.Constant(1 - drop), when="train")
    model.train()
    opt = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.999), device)
    ema = build_ema(model, 0.9999, "torch_ema")
    step = TrainStep(model, model, opt, torch.nn.CrossEntropyLoss(label_smoothing=0.1), device, clip_grad=1.0, ema=ema)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 100, (32,))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(x, y)
        step.poll()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


d0, d35 = step_seconds(0.0), step_seconds(0.35)
print(f"RESULT {td.__file__} d0={d0:.4f} d35={d35:.4f} speedup={d0 / d35:.4f}", flush=True)
