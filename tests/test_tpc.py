"""TPC-ViT (seed 003, research/tpc-vit-spec.md): halting arithmetic, A-ViT compatibility, packed = masked,
restart modes, the κ-nearest-key stabiliser, losses and gradients, parameter checks, detach and MACs — each
against an independent computation written here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tokendrop as td
from tokendrop.bench.flops import analytic_macs, count_macs
from tokendrop.models.attention import attend
from tokendrop.tpc.model import _masked_block


def small_vit(depth=6, **kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=depth, num_heads=3, num_classes=5,
                             qkv_bias=True, **kw).eval()


def images(b=3):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tpc(model, **params):
    return td.attach_tpc(copy.deepcopy(model), **params)


def run(model, x):
    with torch.no_grad():
        return model(x), td.tpc.last_stats(model)


# Gates that halt tokens at varied depths on the random-weight small_vit (σ(y_0)·σ(y_1) ≈ 0.2–0.3).
VARIED = dict(gamma=1.0, beta=0.0)


# --------------------------------------------------------------------------------------- halting core
def test_halting_hand_case():
    p, rho, M = td.tpc.halting(torch.tensor([0.3, 0.5, 0.3]).view(3, 1, 1))
    assert torch.allclose(p.flatten(), torch.tensor([0.3, 0.5, 0.2]))
    assert rho.item() == pytest.approx(3.2)
    assert M.item() == 3


def test_halting_matches_its_definition():
    b = torch.rand(6, 2, 5, generator=torch.Generator().manual_seed(3)) * 0.6
    delta = 0.01
    p, rho, M = td.tpc.halting(b, delta)
    for i in range(2):
        for k in range(5):
            col = b[:, i, k].tolist()
            col[-1] = 1.0
            sums = [sum(col[:n + 1]) for n in range(6)]
            m = next(n for n in range(6) if sums[n] >= 1 - delta) + 1  # M_k = min{n: Σ_{l≤n} b ≥ 1−δ}
            R = 1 - sum(col[:m - 1])
            want = col[:m - 1] + [R] + [0.0] * (6 - m)
            assert M[i, k].item() == m
            assert rho[i, k].item() == pytest.approx(m + R, abs=1e-6)
            assert p[:, i, k].tolist() == pytest.approx(want, abs=1e-6)
    assert torch.allclose(p.sum(0), torch.ones(2, 5))
    assert len(set(M.flatten().tolist())) > 1  # not degenerate


# --------------------------------------------------------------------------------- A-ViT compatibility
def naive_halting(model, x, gate, eps=0.01):
    """A-ViT's halting loop (spec §2), written from its description with an explicit attention and the
    −1000 key bias on halted tokens. ``gate(t, m)`` gives the break probability of block output ``t`` for
    the running tokens ``m``. Returns logits, ρ, the 1-based halting layer and the gate means per layer."""
    t = model._pos_embed(model.patch_embed(x))
    B, N, C = t.shape
    c, R, rho = torch.zeros(B, N), torch.ones(B, N), torch.zeros(B, N)
    m = torch.ones(B, N)
    depth = torch.zeros(B, N, dtype=torch.long)
    out = torch.zeros(B, N, C)
    L = len(model.blocks)
    D = []
    for l, blk in enumerate(model.blocks):
        a = blk.attn
        H, Dh = a.num_heads, C // a.num_heads
        w = m.unsqueeze(-1)
        t = t * w
        h = blk.norm1(t) * w
        q, k, v = (h @ a.qkv.weight.T + a.qkv.bias).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(Dh) - 1000.0 * (1 - m)[:, None, None, :]
        att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C) @ a.proj.weight.T + a.proj.bias
        t = t + att
        t = t + blk.mlp(blk.norm2(t * w) * w)
        g = gate(t, m)
        D.append(((g * m).sum(1) / m.sum(1)).mean())
        hb = torch.ones(B, N) if l == L - 1 else g
        c = c + hb
        rho = rho + m
        reached = (c > 1 - eps) & (m > 0)
        notreached = c < 1 - eps
        rho = rho + R * reached
        out = out + (R * reached).unsqueeze(-1) * t
        R = R - hb * notreached
        out = out + (hb * notreached).unsqueeze(-1) * t
        depth[reached] = l + 1
        m = notreached.float()
    return model.head(model.norm(out[:, 0])), rho, depth, torch.stack(D)


@pytest.mark.parametrize("mode", ["masked", "packed"])
def test_avit_compat_reproduces_avit_halting_loop(mode):
    base = small_vit()
    x = images()
    gamma, beta = 2.0, 1.0
    model = tpc(base, **td.tpc.AVIT_COMPAT, gamma=gamma, beta=beta, mode=mode)
    logits, stats = run(model, x)
    with torch.no_grad():
        want, rho, depth, _ = naive_halting(base, x, lambda t, m: torch.sigmoid(gamma * t[:, :, 0] - beta))
    assert 1 < len(set(depth.flatten().tolist()))  # tokens halt at several depths
    assert (depth < len(base.blocks)).any()
    assert torch.equal(stats.depth, depth)
    assert torch.allclose(stats.ponder, rho, atol=1e-5)
    assert torch.allclose(logits, want, atol=1e-4)


@pytest.mark.parametrize("regularise", ["break", "gates"])
def test_tpc_matches_naive_loop_with_restart_gate_and_regulariser(regularise):
    base = small_vit()
    x = images()
    xi, d1, d2 = 0.3, 4, 11

    def mean(v, m):
        return (v * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)

    def gate(t, m):  # Eq. 4, 5 and 9: b = P1·P2, each or their product pulled towards the image's mean
        p1, p2 = torch.sigmoid(t[:, :, d1]), torch.sigmoid(t[:, :, d2])
        if regularise == "gates":
            return (xi * p1 + (1 - xi) * mean(p1, m)) * (xi * p2 + (1 - xi) * mean(p2, m))
        return xi * p1 * p2 + (1 - xi) * mean(p1 * p2, m)

    model = tpc(base, gamma=1.0, beta=0.0, dims=(d1, d2), xi=xi, regularise=regularise, kappa=None)
    logits, stats = run(model, x)
    with torch.no_grad():
        want, rho, depth, D = naive_halting(base, x, gate)
    assert 1 < len(set(depth.flatten().tolist())) and (depth < len(base.blocks)).any()
    assert torch.equal(stats.depth, depth)
    assert torch.allclose(stats.ponder, rho, atol=1e-5)
    assert torch.allclose(stats.distribution, D, atol=1e-6)
    assert torch.allclose(logits, want, atol=1e-4)


# ------------------------------------------------------------------------------------ packed = masked
@pytest.mark.parametrize("build", [small_vit, lambda: td.build_model("hybrid_vit_tiny", num_classes=5).eval()])
@pytest.mark.parametrize("opts", [dict(kappa=None), dict(kappa=12), dict(restart_mode="skip", kappa=20),
                                  dict(regularise="gates", xi=0.3, kappa=None)])
def test_packed_equals_masked(build, opts):
    base = build()
    beta = VARIED["beta"] if len(base.blocks) > 4 else -0.5
    x = images()
    masked, s_m = run(tpc(base, gamma=1.0, beta=beta, mode="masked", **opts), x)
    packed, s_p = run(tpc(base, gamma=1.0, beta=beta, mode="packed", **opts), x)
    counts = s_m.counts
    assert any(len(set(row.tolist())) > 1 for row in counts)  # images differ: packing pads
    assert torch.equal(counts, s_p.counts) and torch.equal(s_m.depth, s_p.depth)
    assert torch.allclose(s_m.ponder, s_p.ponder, atol=1e-5)
    assert (masked - packed).abs().max() <= 1e-4


def test_everything_halting_at_layer_one_reads_block_zero():
    base = small_vit()
    x = images(2)
    with torch.no_grad():
        t = base.blocks[0](base._pos_embed(base.patch_embed(x)))
        want = base.head(base.norm(t[:, 0]))
    for mode in ("masked", "packed"):
        logits, stats = run(tpc(base, gamma=1.0, beta=-30.0, kappa=None, mode=mode), x)
        assert (stats.depth == 1).all()
        assert (stats.counts[1:] == 0).all()
        assert torch.allclose(logits, want, atol=1e-5)


def test_masked_block_equals_the_block_on_present_tokens_and_keeps_the_rest():
    blk = small_vit().blocks[1]
    x = torch.randn(2, 9, 48)
    present = torch.ones(2, 9, dtype=torch.bool)
    present[0, [2, 5, 6]] = False
    present[1, 8] = False
    with torch.no_grad():
        y = _masked_block(blk, x, present, lambda *a: None)
        for i in range(2):
            assert torch.equal(y[i, ~present[i]], x[i, ~present[i]])
            alone = blk(x[i:i + 1, present[i]])  # timm's own block on the present tokens only
            assert torch.allclose(y[i, present[i]], alone[0], atol=1e-5)


# ----------------------------------------------------------------------------------------- restarts
def alive_before(depth, layer):
    """Tokens not yet halted when 0-based ``layer`` starts."""
    return (depth == 0) | (depth > layer)


def test_restart_none_never_readmits_a_halted_token():
    model = tpc(small_vit(), **VARIED, kappa=None)
    _, s = run(model, images())
    act = s.active
    assert not (act[1:] & ~act[:-1]).any()  # active at l+1 ⇒ active at l
    for layer in range(act.shape[0]):
        assert torch.equal(act[layer], alive_before(s.depth, layer))
    assert (s.depth < act.shape[0]).any()  # some tokens halt early


def test_skip_sits_out_exactly_one_layer():
    model = tpc(small_vit(depth=8), gamma=1.0, beta=0.0, restart_mode="skip", kappa=None, mode="packed")
    _, s = run(model, images())
    act, L = s.active, s.active.shape[0]
    cls_wants_pause = (s.pause[:-2, :, 0] >= 0.5) & act[:-2, :, 0]
    assert cls_wants_pause.any()  # so the class token's exemption is exercised
    sat_out = 0
    for layer in range(1, L):
        alive = alive_before(s.depth, layer)
        paused = alive & act[layer - 1] & (s.pause[layer - 1] >= 0.5)
        paused[:, 0] = False  # the class token never sits out
        if layer == L - 1:
            paused[:] = False  # the last layer halts every running token
        assert torch.equal(act[layer], alive & ~paused)
        if layer + 1 < L:  # back at the next layer while running
            assert act[layer + 1][paused & alive_before(s.depth, layer + 1)].all()
        sat_out += int(paused.sum())
    assert sat_out > 0
    # a layer sat out costs no ponder: ρ = layers processed + remainder R ∈ (δ, 1]
    extra = s.ponder - act.sum(0)
    assert (extra > 0.01).all() and (extra <= 1 + 1e-6).all()
    # a token sat out and came back: reactivation is visible in the per-layer masks
    assert (act[2:] & ~act[1:-1] & act[:-2]).any()


# --------------------------------------------------------------------------------------- stabiliser
def explicit_knn_attention(a, x, present, kappa, shared=False):
    """Dense attention with every logit outside the κ nearest present keys (Euclidean, per head) at −∞."""
    B, T, C = x.shape
    H, D = a.num_heads, C // a.num_heads
    q, k, v = (x @ a.qkv.weight.T + a.qkv.bias).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    dist = torch.cdist(q, k) ** 2  # (B, H, T, T)
    if shared:
        dist = dist.sum(1, keepdim=True).expand(-1, H, -1, -1)
    dist = dist.masked_fill(~present[:, None, None, :], float("inf"))
    near = dist.topk(min(kappa, T), dim=-1, largest=False).indices
    keep = torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, near, True) & present[:, None, None, :]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~keep, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ a.proj.weight.T + a.proj.bias


@pytest.mark.parametrize("shared", [False, True])
def test_stabiliser_keeps_the_nearest_keys(shared):
    a = small_vit().blocks[2].attn
    x = torch.randn(2, 12, 48)
    present = torch.ones(2, 12, dtype=torch.bool)
    present[1, [3, 4, 9]] = False
    bias = torch.zeros(2, 12).masked_fill(~present, torch.finfo(torch.float32).min)
    with torch.no_grad():
        for kappa in (1, 4, 9, 12):
            stab = lambda q, k: td.tpc.neighbour_bias(q, k, kappa, present, shared=shared)  # noqa: E731
            got, _ = attend(a, x, bias, logit_bias=stab)
            assert torch.allclose(got, explicit_knn_attention(a, x, present, kappa, shared), atol=1e-5)
        dense, _ = attend(a, x, bias)
        assert torch.allclose(got, dense, atol=1e-5)  # κ ≥ present keys: dense attention
        assert not torch.allclose(attend(a, x, bias, logit_bias=lambda q, k: td.tpc.neighbour_bias(q, k, 4, present))[0],
                                  dense, atol=1e-3)


def test_stabiliser_changes_the_model_only_below_the_token_count():
    base, x = small_vit(), images(2)
    dense, _ = run(tpc(base, **VARIED, kappa=None), x)
    wide, _ = run(tpc(base, **VARIED, kappa=65), x)  # 64 patches + CLS
    narrow, _ = run(tpc(base, **VARIED, kappa=8), x)
    assert torch.allclose(dense, wide, atol=1e-6)
    assert not torch.allclose(dense, narrow, atol=1e-3)


# ------------------------------------------------------------------------------------- losses, grads
@pytest.mark.parametrize("distribution", ["active", "halting", "avit"])
def test_losses_finite_and_gradients_reach_the_gates(distribution):
    model = tpc(small_vit(), **VARIED, kappa=16, learn_gates=True, distribution=distribution, restart_mode="skip")
    model.train()
    x, y = images(), torch.tensor([0, 1, 2])
    logits = model(x)
    aux = td.aux_loss(model)
    assert torch.isfinite(aux) and aux.item() > 0
    assert td.aux_loss(model) == 0.0  # cleared once read
    (F.cross_entropy(logits, y) + aux).backward()
    for p in (model.tpc.gamma, model.tpc.beta):
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad.abs().item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ponder_loss_alone_trains_the_gate_channels():
    model = tpc(small_vit(), **VARIED, kappa=None, phi_d=0.0, dims=(3, 7))
    model.train()
    model(images())
    td.aux_loss(model).backward()
    g = model.blocks[1].mlp.fc2.bias.grad
    assert g[[3, 7]].abs().min() > 0  # the ponder cost reaches the gate channels of the block output
    s = td.tpc.last_stats(model)
    assert s.ponder_loss.item() == pytest.approx(s.ponder.mean().item())


def test_distribution_losses_against_their_formulas():
    D = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.3, 0.1])
    d_hat = (D / D.sum()).clamp(0.01, 0.99)
    t = torch.tensor([math.exp(-0.5 * (l - 4) ** 2) for l in range(6)], dtype=torch.float64)
    t = (t / t.sum()).float()
    want = sum(d * math.log(d / tt) for d, tt in zip(d_hat.tolist(), t.tolist()))
    assert td.tpc.distribution_loss(D, 4.0).item() == pytest.approx(want, rel=1e-5)
    # A-ViT's target for 12 layers centred at 8 (spec §2) and its reverse, layer-averaged KL
    spec = [0, 0, 0, 0, .00044, .01445, .17606, .78905, 1.30092, .78905, .17606, .01445]
    ta = td.tpc.avit_target(12, 8.0)
    assert ta.tolist() == pytest.approx(spec, abs=2e-4)
    D12 = torch.linspace(0.1, 1.0, 12)
    d12 = (D12 / D12.sum()).clamp(0.01, 0.99).double()
    kl = sum(tt * math.log(tt / d) for tt, d in zip(ta.tolist(), d12.tolist()) if tt > 0) / 12
    assert td.tpc.distribution_loss(D12, 8.0, avit=True).item() == pytest.approx(max(kl, 0.0), rel=1e-5)


# ----------------------------------------------------------------------------------- parameters, API
@pytest.mark.parametrize("params, name", [
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"), (dict(kappa=0), "kappa"), (dict(kappa=2.5), "kappa"),
    (dict(mode="dense"), "mode"), (dict(restart_mode="always"), "restart_mode"), (dict(xi=1.5), "xi"),
    (dict(gamma=0.0), "gamma"), (dict(dims=(0, 0)), "dims"), (dict(dims=(0, 48)), "dims"),
    (dict(phi_p=-1.0), "phi_p"), (dict(target_depth=6), "target_depth"), (dict(distribution="kl"), "distribution"),
    (dict(metric="cosine"), "metric"), (dict(tau=1.0), "tau"),
])
def test_bad_parameters_name_themselves(params, name):
    model = small_vit()
    with pytest.raises(ValueError, match=f"^{name}:"):
        td.attach_tpc(model, **params)
    assert type(model) is VisionTransformer and not hasattr(model, "tpc")  # nothing changed


def test_detach_restores_the_model_and_conflicts_are_refused():
    model, x = small_vit(), images(2)
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    td.attach_tpc(model, **VARIED)
    assert set(model.state_dict()) == keys  # fixed gates add no weights
    with pytest.raises(ValueError, match="^model:"):
        td.attach(model, "topk", blocks=[1])
    with pytest.raises(ValueError, match="^model:"):
        td.attach_tpc(model)
    td.detach(model)
    assert type(model) is VisionTransformer and not hasattr(model, "tpc")
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    td.attach(model, "topk", blocks=[1])
    with pytest.raises(ValueError, match="^model:"):
        td.attach_tpc(model)
    td.detach(model)
    learned = td.attach_tpc(model, learn_gates=True)
    assert set(learned.state_dict()) == keys | {"tpc.gamma", "tpc.beta"}


def test_models_tpc_cannot_run_are_refused():
    with pytest.raises(TypeError, match="class token"):
        td.attach_tpc(small_vit(global_pool="avg"))
    assert td.attach_tpc(td.build_model("hybrid_vit_ptd", num_classes=3))  # ours: supported


def test_default_gate_runs_every_token_to_the_last_layer():
    base = small_vit(depth=4)
    _, s = run(tpc(base), images(2))  # σ(5·y − 40) ≈ 0 on unit-scale activations
    assert (s.depth == 4).all() and (s.counts == 65).all()
    assert (s.gate_logits < -30).all()  # the saturated gate shows in the statistics


# --------------------------------------------------------------------------------------------- MACs
def test_macs_from_counts_match_the_measured_packed_forward():
    base = small_vit()
    model = tpc(base, **VARIED, kappa=20, mode="packed")
    x = images(1)  # batch 1: each layer runs exactly its count
    measured = count_macs(model, x)
    stats = td.tpc.last_stats(model)
    got = td.tpc.tpc_macs(model, 32)
    counts = stats.counts[:, 0].tolist()
    assert counts[-1] < 65  # tokens were removed
    width = 48
    # FlopCounterMode sees the ranking's Q·Kᵀ but not ‖k‖² nor the elementwise gates
    unmeasured = sum(n * width for n in counts if n > 20) + got["gates"][0].item()
    assert got["total"][0].item() - unmeasured == measured
    dense = tpc_dense = td.tpc.tpc_macs(model, 32, torch.full((6, 1), 65))
    assert dense["backbone"][0].item() == analytic_macs(base, 32)
    assert tpc_dense["total"][0] > got["total"][0]
