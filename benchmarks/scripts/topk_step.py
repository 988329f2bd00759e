"""Time the PTD report model's training step with Top-K at d = 0.35 in block 0 (and d = 0) on whatever
tokendrop is first on the path: `PYTHONPATH=CHECKOUT python benchmarks/scripts/topk_step.py`."""
import statistics
import time

import torch
import tokendrop as td
torch.manual_seed(0)
torch.set_num_threads(2)
def step_times(drop):
    model = td.build_model("hybrid_vit_ptd", num_classes=100)
    if drop:
        td.attach(model, td.TopK("cls_attention"), blocks=[0], schedule=td.Constant(1 - drop), when="train")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(32, 3, 32, 32); y = torch.randint(0, 100, (32,))
    ts = []
    for i in range(7):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(); opt.step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[2:])
d0, d35 = step_times(0.0), step_times(0.35)
print(f"RESULT {td.__file__} d0={d0:.4f} d35={d35:.4f} speedup={d0/d35:.4f}", flush=True)
