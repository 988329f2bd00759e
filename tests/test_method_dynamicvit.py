"""DynamicViT (zoo spec §3) against a naive re-implementation written here from the spec: a hand-written
ViT forward with explicit attention matrices and the predictor computed by hand from its weights."""

import pytest
import timm
import torch
import torch.nn.functional as F
from reference import vit_block, vit_embed, vit_head

import tokendrop as td
import tokendrop.models.attention as attention
from tokendrop.methods.dynamicvit import (dynamicvit_decision, dynamicvit_distill_loss,
                                          dynamicvit_token_distill_loss)

BLOCKS = (3, 6, 9)
RATE = 0.7


def deit(seed=0):
    """Random-weight DeiT-Tiny with sharper attention (scaled qk) so masks and choices matter."""
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:384].mul_(4.0)
    return model


def with_dynamicvit(model, when="always", seed=4, **kwargs):
    """Attach DynamicViT at blocks 3/6/9 (keep 0.7 of the original patches per stage) and widen the
    predictors' weights so their keep scores are well separated (no near-ties)."""
    td.attach(model, lambda f: td.reducer("dynamicvit", dim=f.dim, **kwargs), blocks=BLOCKS,
              schedule=td.Constant(RATE), relative_to="original", when=when)
    torch.manual_seed(seed)
    with torch.no_grad():
        for b in BLOCKS:
            for m in predictor(model, b).modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.normal_(0.0, m.in_features ** -0.5)
                    m.bias.normal_(0.0, 0.1)
            last = predictor(model, b).out_conv[4]
            last.weight.mul_(10.0)
            last.bias.zero_()
    return model


def sample_images(n=2):
    torch.manual_seed(100)
    return torch.randn(n, 3, 224, 224)


def predictor(model, block):
    return model.blocks[block].token_site.reducer.predictor


def naive_logp(pred, z, prev):
    """PredictorLG by hand: LN → Linear → GELU; local half, D_prev-weighted mean of the global half + 1e-6;
    three Linear layers with GELU; log-softmax. Channel 0 = keep."""
    ln, fc = pred.in_conv[0], pred.in_conv[1]
    h = F.gelu(F.layer_norm(z, z.shape[-1:], ln.weight, ln.bias, 1e-5) @ fc.weight.T + fc.bias)
    half = h.shape[-1] // 2
    glob = (h[..., half:] * prev[..., None]).sum(1, keepdim=True) / prev.sum(1)[:, None, None] + 1e-6
    u = torch.cat([h[..., :half], glob.expand(-1, h.shape[1], -1)], dim=-1)
    l1, l2, l3 = pred.out_conv[0], pred.out_conv[2], pred.out_conv[4]
    u = F.gelu(u @ l1.weight.T + l1.bias)
    u = F.gelu(u @ l2.weight.T + l2.bias)
    return (u @ l3.weight.T + l3.bias).log_softmax(-1)


def naive_eval(model, images):
    """Eval: before each stage keep the top int(196·0.7^s) by keep log-prob, descending."""
    x = vit_embed(model, images)
    src = torch.arange(196).expand(images.shape[0], 196)
    kept, gaps = [], []
    for i, blk in enumerate(model.blocks):
        if i in BLOCKS:
            s = BLOCKS.index(i) + 1
            k = int(196 * RATE ** s)
            logp = naive_logp(predictor(model, i), x[:, 1:], torch.ones(x.shape[0], x.shape[1] - 1))
            idx = torch.sort(logp[..., 0], dim=1, descending=True).indices[:, :k]
            odds = (logp[..., 0] - logp[..., 1]).sort(dim=1).values  # the same order, unsaturated
            gaps.append((odds[:, 1:] - odds[:, :-1]).min())
            x = torch.cat([x[:, :1], torch.stack([x[b, 1:][idx[b]] for b in range(x.shape[0])])], dim=1)
            src = torch.stack([src[b][idx[b]] for b in range(x.shape[0])])
            kept.append(src)
        x = vit_block(blk, x)
    return vit_head(model, x), kept, min(gaps)


def naive_train(model, images):
    """Training: all tokens stay; every block uses the softmax with policy (all ones before stage 1);
    before each stage D = gumbel_softmax(log p, hard)[..., 0] · D_prev; ratio loss 2·mean_s mean_b(...)²."""
    x = vit_embed(model, images)
    B = x.shape[0]
    decision = torch.ones(B, 196)
    terms = []
    for i, blk in enumerate(model.blocks):
        if i in BLOCKS:
            s = BLOCKS.index(i) + 1
            logp = naive_logp(predictor(model, i), x[:, 1:], decision)
            decision = F.gumbel_softmax(logp, tau=1, hard=True)[..., 0] * decision
            terms.append(((decision.sum(1) / 196 - RATE ** s) ** 2).mean())
        x = vit_block(blk, x, torch.cat([torch.ones(B, 1), decision], dim=1))
    return vit_head(model, x), 2.0 * sum(terms) / len(terms), decision


def test_eval_matches_naive_and_keeps_137_96_67():
    model = with_dynamicvit(deit())
    images = sample_images()
    with torch.no_grad():
        out = model(images)
        ref, kept, gap = naive_eval(model, images)
    assert gap > 1e-5  # no near-ties in the keep scores
    assert not any(site.training for site in td.sites(model))  # sites take the mode of the model they join
    records = td.last_reduction(model).records
    assert [r.kept for r in records] == [137, 96, 67] == [k.shape[1] for k in kept]
    assert td.expected_patch_tokens(model, training=False) == [137, 96, 67]
    for rec, k in zip(records, kept):
        assert torch.equal(rec.source, k)  # same tokens, same (descending score) order
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # the test can fail: the plain model differs
        assert (td.detach(model)(images) - out).abs().max() > 1e-3


def test_training_forward_and_ratio_loss_match_naive(monkeypatch):
    model = with_dynamicvit(deit()).train()
    images = sample_images()
    calls = []
    policy_attention = attention._policy_attention
    monkeypatch.setattr(attention, "_policy_attention", lambda *a: calls.append(1) or policy_attention(*a))
    torch.manual_seed(5)
    out = model(images)
    loss = td.aux_loss(model)
    assert len(calls) == 12  # every block uses the softmax with policy, from block 0 on
    assert [r.kept for r in td.last_reduction(model).records] == [196, 196, 196]  # all tokens stay
    torch.manual_seed(5)
    with torch.no_grad():
        ref, ref_loss, ref_decision = naive_train(model, images)
    assert 0 < ref_decision.sum() < ref_decision.numel()  # some tokens masked, some kept
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dynamicvit_decision(model), ref_decision)
    # a second forward starts afresh (the site count and policy are per forward)
    torch.manual_seed(5)
    model(images)
    torch.testing.assert_close(td.aux_loss(model), ref_loss, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # masking matters: without the policy the output differs
        x = vit_embed(model, images)
        for blk in model.blocks:
            x = vit_block(blk, x)
        assert (vit_head(model, x) - out).abs().max() > 1e-3


def test_training_step_reaches_every_predictor():
    model = with_dynamicvit(deit()).train()
    images, targets = sample_images(), torch.tensor([1, 7])
    loss = F.cross_entropy(model(images), targets) + td.aux_loss(model)
    loss.backward()
    for b in BLOCKS:
        grads = [p.grad for p in predictor(model, b).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_when_train_leaves_evaluation_unchanged():
    model = deit()
    images = sample_images()
    with torch.no_grad():
        plain = model(images)
        with_dynamicvit(model, when="train")
        assert torch.equal(model(images), plain)


def test_parameters_save_and_load():
    model = with_dynamicvit(deit(), seed=1)
    state = model.state_dict()
    assert "blocks.6.token_site.reducer.predictor.out_conv.4.weight" in state
    other = with_dynamicvit(deit(), seed=2)
    images = sample_images()
    with torch.no_grad():
        before = other(images)
        other.load_state_dict(state)
        assert (other(images) - before).abs().max() > 1e-4  # the loaded predictors choose differently
        torch.testing.assert_close(other(images), model(images), atol=0, rtol=0)


def test_init_and_defaults():
    red = td.reducer("dynamicvit", dim=192)
    assert red.default_position == "before" and red.ratio_weight == 2.0 and red.predictor.eps == 1e-6
    linears = [m for m in red.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(192, 192), (96, 192), (48, 96), (2, 48)]
    for m in linears:
        assert m.bias.abs().max() == 0 and m.weight.abs().max() <= 2.0 and 0.015 < m.weight.std() < 0.025
    assert red.predictor.in_conv[0].eps == 1e-5


@pytest.mark.parametrize("kwargs, name", [
    ({"dim": 3}, "dim"), ({"dim": True}, "dim"), ({"dim": 192, "ratio_weight": -1.0}, "ratio_weight"),
    ({"dim": 192, "pool_eps": -1e-6}, "pool_eps"), ({"dim": 192, "tau": 1.0}, "reducer_args"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        td.reducer("dynamicvit", **kwargs)


def test_distillation_terms():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    ps, pt = s.softmax(-1), t.softmax(-1)
    kl = sum((pt[b] * (pt[b].log() - ps[b].log())).sum() for b in range(4)) / 4
    torch.testing.assert_close(dynamicvit_distill_loss(s, t), kl)
    ts, tt = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    decision = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 1, 1]])
    pairs = [(ts[b, n], tt[b, n]) for b in range(2) for n in range(5) if decision[b, n] == 1]
    mse = sum(((a - c) ** 2).sum() for a, c in pairs) / (len(pairs) * 8)
    torch.testing.assert_close(dynamicvit_token_distill_loss(ts, tt, decision), mse)
    kl_tok = sum((c.softmax(-1) * (c.log_softmax(-1) - a.log_softmax(-1))).sum() for a, c in pairs) / len(pairs)
    torch.testing.assert_close(dynamicvit_token_distill_loss(ts, tt, decision, kind="kl"), kl_tok)
    assert dynamicvit_token_distill_loss(ts, tt, torch.zeros(2, 5)) == 0
    with pytest.raises(ValueError, match="^kind: "):
        dynamicvit_token_distill_loss(ts, tt, decision, kind="l1")
