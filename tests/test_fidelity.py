"""PTD on hybrid_vit_ptd against a naive re-implementation of the seed author's reference PTD model,
written here from DESIGN.md's facts (explicit attention matrix, per-sample top-k loop)."""

import pytest
import torch
import torch.nn.functional as F

import tokendrop as td
from reference import drop_ratio


def reference_forward(sd, x, epoch, heads=6):
    """Training-mode forward (BN on batch statistics, no dropout) of the reference PTD model."""
    h = x
    for i, stride in zip((0, 3, 6), (1, 2, 1)):
        h = F.conv2d(h, sd[f"patch_embed.proj.{i}.weight"], stride=stride, padding=1)
        h = F.batch_norm(h, None, None, sd[f"patch_embed.proj.{i + 1}.weight"], sd[f"patch_embed.proj.{i + 1}.bias"], training=True)
        h = F.relu(h)
    B, E = h.shape[:2]
    tokens = h.flatten(2).transpose(1, 2)
    z = torch.cat([sd["cls_token"].expand(B, -1, -1), tokens], 1) + sd["pos_embed"]
    kept_sets = None
    for blk in range(6):
        p = f"blocks.{blk}."
        ln1 = F.layer_norm(z, (E,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        T = z.shape[1]
        q, k, v = (ln1 @ sd[p + "attn.qkv.weight"].T).reshape(B, T, 3, heads, E // heads).permute(2, 0, 3, 1, 4)
        A = torch.softmax(q @ k.transpose(-1, -2) / (E // heads) ** 0.5, dim=-1)
        attn_out = (A @ v).transpose(1, 2).reshape(B, T, E) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        d = drop_ratio(epoch)
        if blk == 0 and d > 0:
            n = T - 1
            keep = max(1, int(n * (1.0 - d)))
            sal = A.mean(1)[:, 0, 1:]
            rows, kept_sets = [], []
            for b in range(B):
                order = sorted(range(n), key=lambda i: -float(sal[b, i]))
                s_sorted = sorted(sal[b].tolist(), reverse=True)
                assert s_sorted[keep - 1] - s_sorted[keep] > 1e-7, "near-tie in top-k: pick another seed"
                idx = order[:keep]
                kept_sets.append(set(idx))
                sel = [0] + [1 + i for i in idx]
                rows.append(z[b, sel] + attn_out[b, sel])
            z = torch.stack(rows)
        else:
            z = z + attn_out
        ln2 = F.layer_norm(z, (E,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        hid = F.gelu(ln2 @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        z = z + hid @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    cls = F.layer_norm(z[:, 0], (E,), sd["norm.weight"], sd["norm.bias"])
    return cls @ sd["head.weight"].T + sd["head.bias"], kept_sets


@pytest.mark.parametrize("epoch", [0, 90, 140])
def test_ptd_matches_reference(epoch):
    torch.manual_seed(11)
    model = td.build_model("hybrid_vit_ptd", num_classes=100, drop_rate=0.0, drop_path_rate=0.0)
    td.attach(model, td.TopK("cls_attention"), blocks=[0], schedule=td.Curriculum(40, 140, final=0.35, gamma=2.0), when="train")
    td.set_epoch(model, epoch)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        logits = model(x)
        ref_logits, ref_kept = reference_forward(sd, x, epoch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    records = td.last_reduction(model).records
    if epoch == 0:
        assert ref_kept is None and records == []
    else:
        expected_k = {90: 233, 140: 166}[epoch]
        assert records[0].kept == expected_k
        assert [set(s.tolist()) for s in records[0].source] == ref_kept
