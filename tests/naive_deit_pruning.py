"""A hand-written DeiT forward for the pruning-method fidelity tests: one image at a time, an explicit
attention matrix per head, the weights of a timm model — and no tokendrop code.

A pruning step is a function ``step(x, attn, k, v, tokens) -> (x, tokens)`` run in its block after the
attention residual and before the MLP: ``x`` (T, C) the tokens (CLS first), ``attn`` (H, T, T) the
block's attention probabilities, ``k``/``v`` (H, T, D), ``tokens`` the set of original patches each
current patch token stands for.
"""

import copy
import functools

import timm
import torch
import torch.nn.functional as F

BLOCKS = (3, 6, 9)
PATCHES = 196


def targets(rate=0.7, stages=3):
    """Seed 004's keep targets ``int(P·r^s)`` (float64 arithmetic, truncated)."""
    return [int(PATCHES * rate ** s) for s in range(1, stages + 1)]


def deit_tiny(qk_scale=1.0, seed=0):
    """A fresh random-weight timm DeiT-Tiny in eval mode; the query and key weights are multiplied by
    ``qk_scale`` so attention is far from uniform (no near-ties in the rankings)."""
    return copy.deepcopy(_deit_tiny(qk_scale, seed))


@functools.lru_cache(maxsize=None)
def _deit_tiny(qk_scale, seed):
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].mul_(qk_scale)
    return model


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def naive_forward(model, image, steps):
    """Logits of one image (3, H, W) and, per step, the token sets after it. ``steps``: block → step."""
    sd = model.state_dict(keep_vars=True)  # the parameters themselves: gradients reach them
    heads = model.blocks[0].attn.num_heads
    w = sd["patch_embed.proj.weight"]
    patches = F.conv2d(image[None], w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2)[0].T
    x = torch.cat([sd["cls_token"][0], patches]) + sd["pos_embed"][0]
    tokens = [{p} for p in range(patches.shape[0])]
    history = []
    for i in range(len(model.blocks)):
        pre = f"blocks.{i}."
        T, C = x.shape
        D = C // heads
        qkv = _ln(x, sd, pre + "norm1") @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
        q, k, v = qkv.reshape(T, 3, heads, D).permute(1, 2, 0, 3)  # each (H, T, D)
        attn = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, dim=-1)
        out = (attn @ v).transpose(0, 1).reshape(T, C)
        x = x + out @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        if i in steps:
            x, tokens = steps[i](x, attn, k, v, tokens)
            history.append(tokens)
        hidden = F.gelu(_ln(x, sd, pre + "norm2") @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        x = x + hidden @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    return _ln(x, sd, "norm")[0] @ sd["head.weight"].T + sd["head.bias"], history


def assert_gap(values, cut, margin=1e-6, what="ranking"):
    """The test's own values sorted descending must not nearly tie across position ``cut``."""
    ordered = sorted(values, reverse=True)
    if 0 < cut < len(ordered):
        assert ordered[cut - 1] - ordered[cut] > margin, f"near-tie in the {what}: pick another seed"


def assert_records_match(records, histories):
    """Each site's record (source, assignment, size where set) equals the naive token sets, per image."""
    for s, rec in enumerate(records):
        for b, history in enumerate(histories):
            tokens = history[s]
            count = len(tokens)
            assert rec.source[b, :count].tolist() == [min(t) for t in tokens]
            owner = [-1] * PATCHES
            for j, members in enumerate(tokens):
                for p in members:
                    owner[p] = j
            assert rec.assignment[b].tolist() == owner
            if rec.size is not None:
                assert rec.size[b, :count].tolist() == [float(len(t)) for t in tokens]
