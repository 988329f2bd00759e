"""Whole-step capture (tokendrop.train.graphs) against the eager step. On the CPU the graphs are
:class:`graph_replay.CpuGraphBackend`'s operator logs, which bake Python numbers in as CUDA graphs do; on
a CUDA machine the last test compares real CUDA graphs with the eager step."""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from tokendrop import build_model
from tokendrop.train.ema import build_ema
from tokendrop.train.graphs import StepGraphs
from tokendrop.train.optim import build_adamw
from tokendrop.train.step import TrainStep, graph_blockers

from graph_replay import CpuGraphBackend

LR, BETAS, WD, CLIP, BATCH = 2e-3, (0.9, 0.999), 0.05, 0.5, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(reducer: str = "topk", **args) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("hybrid_vit_tiny", num_classes=10, in_chans=1, img_size=16, drop_rate=0.0, drop_path_rate=0.0)
    schedule = td.Linear(start=0, end=4, initial=0.0, final=0.5)  # the keep count changes with the epoch
    td.attach(model, td.reducer(reducer, **args), blocks=[1], schedule=schedule, when="train")
    return model.train()


class Run:
    """A model, AdamW over two groups, the warm-up EMA and the step (graphed when ``backend`` is given)."""

    def __init__(self, model: torch.nn.Module, backend=None, device: str = "cpu", **graph_args) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        params = list(self.model.parameters())
        groups = [{"params": params[:4], "weight_decay": 0.0}, {"params": params[4:], "weight_decay": WD}]
        self.opt = build_adamw(groups, LR, BETAS, self.device)
        self.ema = build_ema(self.model, 0.99, "torch_ema").to(self.device)
        self.notices: list[str] = []
        graphed = backend is not None or self.device.type == "cuda"
        self.step = TrainStep(self.model, self.model, self.opt, torch.nn.CrossEntropyLoss(), self.device, amp="off",
                              clip_grad=CLIP, ema=self.ema, cuda_graphs=graphed,
                              graph_backend=backend(self) if backend else None, notice=self.notices.append)
        if self.step.graphs is not None and graph_args:
            for k, v in graph_args.items():
                setattr(self.step.graphs, k, v)

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step changes in place."""
        out = [*self.model.parameters(), *self.model.buffers(), *self.ema.parameters(), *self.ema.buffers()]
        out += [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        out += [g["lr"] for g in self.opt.param_groups if isinstance(g["lr"], torch.Tensor)]
        return out + [self.step.loss_sum, self.step.correct, self.step.first_bad, self.step.step_index]

    def train(self, steps: int) -> list[float]:
        """``steps`` steps; epoch (keep count) and LR change as they go, the LR assigned as a float."""
        gen = torch.Generator().manual_seed(1)
        losses, before = [], 0.0
        for i in range(steps):
            td.set_epoch(self.model, i // 4)
            for g in self.opt.param_groups:
                g["lr"] = LR * (1 - i / steps)
            images = torch.randn(BATCH, 1, 16, 16, generator=gen).to(self.device)
            labels = torch.randint(0, 10, (BATCH,), generator=gen).to(self.device)
            self.step(images, labels)
            total = self.step.poll().loss_sum
            losses.append((total - before) / BATCH)
            before = total
        return losses


def cpu_backend(run: Run) -> CpuGraphBackend:
    return CpuGraphBackend(run.state)


def assert_same_training(a: Run, b: Run, losses_a: list[float], losses_b: list[float], tol: float = 1e-5) -> None:
    assert losses_a == pytest.approx(losses_b, rel=tol)
    assert len(set(losses_b)) == len(losses_b)  # the weights moved every step
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol * 1e-1, msg=name)
    for p, q in zip(a.ema.module.parameters(), b.ema.module.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol * 1e-1)
    assert a.step.poll().first_bad == b.step.poll().first_bad == -1


def test_the_log_bakes_python_numbers_in():
    """The stand-in is faithful where it matters: a Python number read at capture stays in the replay."""
    x = torch.zeros(())
    state = {"lr": 1.0}
    backend = CpuGraphBackend(lambda: [x])
    replay = backend.capture(lambda: x.add_(state["lr"]))
    assert float(x) == 0.0  # the capture ran nothing
    state["lr"] = 5.0
    replay()
    replay()
    assert float(x) == 2.0


def test_replayed_steps_train_as_the_eager_step_does():
    eager, graphed = Run(tiny_model()), Run(tiny_model(), cpu_backend, warmup=1)
    losses_eager, losses_graphed = eager.train(12), graphed.train(12)
    assert_same_training(graphed, eager, losses_graphed, losses_eager)
    backend = graphed.step.graphs.backend
    keep_counts = 3  # epochs 0, 1, 2 of the Linear schedule keep different counts
    assert backend.captures == keep_counts and backend.warmups == keep_counts
    assert graphed.step.graphs.replays == 12 - keep_counts  # every step after its warm-up was a replay
    assert graphed.notices == []


def test_a_float_lr_or_ema_decay_would_go_stale_in_a_graph():
    """Without the LR tensors the graphs would replay the LR of their capture: the test above can fail."""
    graphed = Run(tiny_model(), cpu_backend, warmup=1)
    graphed.step.graphs._sync_optimizer = lambda: None  # keep the groups' float LRs
    eager = Run(tiny_model())
    assert graphed.train(8) != pytest.approx(eager.train(8), rel=1e-5)


def test_a_step_that_syncs_with_the_host_runs_eagerly_after_a_notice():
    """Zero-TP reads token counts on the host (``nonzero``): its capture fails, the step falls back."""
    eager = Run(tiny_model("zero_tp"))
    graphed = Run(tiny_model("zero_tp"), cpu_backend, warmup=1)
    assert_same_training(graphed, eager, graphed.train(6), eager.train(6))
    assert len(graphed.notices) == 1 and "could not be captured" in graphed.notices[0]
    # epoch 0 keeps every token (Zero-TP idle): captured and replayed; epoch 1's capture fails
    assert graphed.step.graphs.failed and graphed.step.graphs.replays == 3


def test_past_the_graph_limit_the_least_recent_graph_makes_room():
    eager, graphed = Run(tiny_model()), Run(tiny_model(), cpu_backend, warmup=1, max_graphs=1)
    assert_same_training(graphed, eager, graphed.train(12), eager.train(12))
    graphs = graphed.step.graphs
    assert (graphs.backend.captures, len(graphs.graphs), graphs.replays) == (3, 1, 9) and graphed.notices == []


def test_signatures_that_never_repeat_end_in_the_eager_step():
    """A keep fraction moved every step (DynamicViT under a per-step schedule) never gets a graph."""
    from tokendrop.train.graphs import MAX_WARMING

    calls, notices = [], []
    graphs = StepGraphs(lambda *x: calls.append(1), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1),
                        torch.device("cpu"), backend=CpuGraphBackend(lambda: []), notice=notices.append)
    x = torch.zeros(2)
    for k in range(MAX_WARMING + 5):
        graphs((k,), x, x, x)
    assert len(calls) == MAX_WARMING + 5 and graphs.failed and graphs.backend.captures == 0
    assert len(notices) == 1 and "do not repeat" in notices[0]


def test_gradient_saliency_and_private_generators_are_not_captured():
    grad = tiny_model("topk", score="gradient")
    assert "block 1" in " ".join(graph_blockers(grad, grad))
    tnt = tiny_model()
    td.attach(tnt, td.reducer("tnt", seed=0), blocks=[2], schedule=td.Constant(1.0), when="train")
    assert len(graph_blockers(tnt, tnt)) == 1
    assert graph_blockers(tiny_model(), tiny_model()) == []
    run = Run(grad, cpu_backend)
    assert run.step.graphs is None and "cannot be captured" in run.notices[0]


def test_reset_keeps_the_tensors_the_graphs_read():
    run = Run(tiny_model(), cpu_backend, warmup=0)
    held = [run.step.loss_sum, run.step.correct, run.step.first_bad, run.step.step_index]
    run.train(2)
    run.step.reset()
    assert all(a is b for a, b in zip(held, [run.step.loss_sum, run.step.correct, run.step.first_bad,
                                             run.step.step_index]))
    assert run.step.poll().loss_sum == 0.0 and run.step.poll().first_bad == -1


def test_a_loaded_optimizer_state_drops_the_graphs():
    run = Run(tiny_model(), cpu_backend, warmup=0)
    run.train(2)
    assert run.step.graphs.graphs
    run.opt.load_state_dict(copy.deepcopy(run.opt.state_dict()))  # new groups and state tensors
    run.step.graphs._sync_optimizer()
    assert not run.step.graphs.graphs and run.step.graphs.backend.releases == 2  # the first sync, and this one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_train_as_the_eager_step_does():
    eager = Run(tiny_model(), device="cuda")
    eager.step.graphs = None
    graphed = Run(tiny_model(), device="cuda")
    assert isinstance(graphed.step.graphs, StepGraphs)
    assert_same_training(graphed, eager, graphed.train(16), eager.train(16), tol=1e-4)
    assert graphed.step.graphs.replays >= 16 - 4 * 3 and not graphed.step.graphs.failed


def test_the_bench_times_replays_only():
    """tokendrop bench's fixed-batch step runs a new keep count's warm-up and capture inside its first call."""
    from tokendrop.bench.probe import FixedBatchStep
    from tokendrop.train.graphs import WARMUP_STEPS

    run = Run(tiny_model(), cpu_backend)
    call = FixedBatchStep(run.step, torch.randn(BATCH, 1, 16, 16), torch.randint(0, 10, (BATCH,)))
    call()
    assert (run.step.steps, run.step.graphs.replays) == (WARMUP_STEPS + 1, 1)
    call()
    assert (run.step.steps, run.step.graphs.replays) == (WARMUP_STEPS + 2, 2)
    td.set_epoch(run.model, 2)  # a new keep count: warm-up and capture again, in one call
    call()
    assert (run.step.steps, run.step.graphs.replays, run.step.graphs.backend.captures) == (2 * WARMUP_STEPS + 3, 3, 2)
