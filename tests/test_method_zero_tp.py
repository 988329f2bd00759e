"""Zero-TP against a naive re-implementation of zoo-spec §13's recommended reconstruction (hand-written
DeiT, explicit attention graph, one image at a time)."""

import math

import pytest
import torch

import tokendrop as td
from naive_deit_pruning import BLOCKS, assert_gap, assert_records_match, deit_tiny, naive_forward, targets


def importance(attn, rounds, variance):
    """WPR ``s ← Aᵀ s`` from 1/T per head, heads whose variance of T·s lies in ``variance`` (all when
    none does, or ``variance`` is None), then the root mean square over those heads, patches only."""
    H, T, _ = attn.shape
    per_head = []
    for h in range(H):
        s = torch.full((T,), 1.0 / T)
        for _ in range(rounds):
            s = attn[h].T @ s  # s_j ← Σ_i A_ij s_i
        per_head.append(s)
    heads = list(range(H))
    if variance is not None:
        low, high = variance
        spread = [float(((T * s - (T * s).mean()) ** 2).mean()) for s in per_head]
        assert all(min(abs(v - low), abs(v - high)) > 1e-5 for v in spread), "variance at a bound: pick another seed"
        heads = [h for h in heads if low <= spread[h] <= high] or heads
    rms = torch.stack([per_head[h] ** 2 for h in heads]).mean(dim=0).sqrt()
    return rms[1:].tolist()


def similarity_pruned(keys, score, alive, r):
    """Among ``alive`` (sorted by ``score`` descending: the top ⌊n/2⌋ are group B, the rest group A),
    the ``r`` A tokens whose largest cosine similarity of keys to a B token is highest."""
    order = sorted(alive, key=lambda j: -score[j])
    assert_gap([score[j] for j in alive], len(alive) // 2, 1e-7, what="partition")
    group_b, group_a = order[: len(order) // 2], order[len(order) // 2:]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    similarity = (unit[group_a] @ unit[group_b].T).max(dim=1).values.tolist()
    best = dict(zip(group_a, similarity))
    assert_gap(list(best.values()), r, what="similarity")
    return set(sorted(group_a, key=lambda a: -best[a])[:r])


def drop(ids, pruned):
    return [j for j in ids if j not in pruned]


def zero_tp_step(keep, rounds, variance=(0.01, 0.7), similar=25, order="similarity_first", stages="both"):
    def step(x, attn, k, v, tokens):
        n = x.shape[0] - 1
        score = importance(attn, rounds, variance)
        keys = k.mean(dim=0)[1:]
        alive = list(range(n))
        top = lambda ids, m: sorted(ids, key=lambda j: -score[j])[:m]  # noqa: E731
        if stages == "similarity":
            alive = drop(alive, similarity_pruned(keys, score, alive, min(n - keep, math.ceil(n / 2))))
        elif stages == "importance":
            assert_gap(score, keep, 1e-7)
            alive = top(alive, keep)
        elif order == "similarity_first":
            alive = drop(alive, similarity_pruned(keys, score, alive, min(similar, n - keep)))
            assert_gap([score[j] for j in alive], keep, 1e-7)
            alive = top(alive, keep)
        else:
            r = min(similar, n - keep)
            assert_gap(score, keep + r, 1e-7)
            alive = top(alive, keep + r)
            alive = drop(alive, similarity_pruned(keys, score, alive, r))
        alive = sorted(alive)
        return x[[0] + [1 + j for j in alive]], [tokens[j] for j in alive]

    return step


CONFIGS = [
    ({}, lambda b: 5 if b < 9 else 1, {}),  # the recommended defaults: rounds 5/5/1 at blocks 3/6/9
    ({"order": "importance_first", "iterations": 2, "head_variance": None}, lambda b: 2,
     {"order": "importance_first", "variance": None}),
    ({"stages": "similarity", "iterations": {3: 1, 6: 3}}, lambda b: {3: 1, 6: 3}.get(b, 1), {"stages": "similarity"}),
    ({"stages": "importance", "head_variance": (0.0, 0.009)}, lambda b: 5 if b < 9 else 1,
     {"stages": "importance", "variance": (0.0, 0.009)}),
]


@pytest.mark.parametrize("kwargs,rounds,naive_kwargs", CONFIGS)
def test_matches_naive_logits_and_kept_tokens(kwargs, rounds, naive_kwargs):
    model = deit_tiny(qk_scale=3.0)  # head variances of T·s straddle 0.01: the head filter acts
    images = torch.randn(2, 3, 224, 224)
    steps = {b: zero_tp_step(keep, rounds(b), **naive_kwargs) for b, keep in zip(BLOCKS, targets())}
    with torch.no_grad():
        naive = [naive_forward(model, img, steps) for img in images]
        td.attach(model, td.reducer("zero_tp", **kwargs), blocks=list(BLOCKS), schedule=td.Constant(0.7),
                  when="always", relative_to="original")
        out = model(images)
    torch.testing.assert_close(out, torch.stack([logits for logits, _ in naive]), atol=1e-4, rtol=0)
    records = td.last_reduction(model).records
    assert [r.kept for r in records] == [137, 96, 67] == td.expected_patch_tokens(model)
    assert_records_match(records, [history for _, history in naive])


def test_head_filter_changes_the_choice():
    """The default variance range drops heads here: without the filter the kept tokens differ."""
    model = deit_tiny(qk_scale=3.0)
    images = torch.randn(2, 3, 224, 224)
    kept = []
    for variance in ((0.01, 0.7), None):
        td.attach(model, td.reducer("zero_tp", head_variance=variance), blocks=list(BLOCKS), schedule=td.Constant(0.7),
                  when="always", relative_to="original")
        with torch.no_grad():
            model(images)
        kept.append(td.last_reduction(model).records[-1].source.sort(dim=1).values)
        td.detach(model)
    assert not torch.equal(*kept)


def test_training_step_has_finite_gradients_and_when_train_keeps_evaluation():
    model = deit_tiny(qk_scale=3.0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = model(images)
    td.attach(model, "zero_tp", blocks=list(BLOCKS), schedule=td.Constant(0.7), when="train", relative_to="original")
    with torch.no_grad():
        assert torch.equal(model(images), plain)
    model.train()
    torch.nn.functional.cross_entropy(model(images), torch.tensor([3, 4])).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert [r.kept for r in td.last_reduction(model).records] == [137, 96, 67]


@pytest.mark.parametrize("kwargs,name", [
    ({"iterations": 0}, "iterations"), ({"iterations": {3: 0}}, "iterations"), ({"head_variance": (0.5, 0.1)}, "head_variance"),
    ({"head_variance": 0.3}, "head_variance"), ({"similar": -1}, "similar"), ({"order": "random"}, "order"),
    ({"stages": "all"}, "stages"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        td.reducer("zero_tp", **kwargs)
