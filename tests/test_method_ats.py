"""ATS against a naive re-implementation of zoo-spec §4 (hand-written DeiT, one image at a time)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokendrop as td
from naive_deit_pruning import BLOCKS, assert_records_match, deit_tiny, naive_forward, targets


def ats_step(keep):
    """Inverse transform sampling with ``Kmax = keep + 1``: points (2i+1)/(2·Kmax), i < Kmax − 1, each
    taking the token of the nearest cdf (the first on ties); distinct tokens kept in ascending order."""
    kmax = keep + 1

    def step(x, attn, k, v, tokens):
        n = x.shape[0] - 1
        score = [sum(float(attn[h, 0, 1 + j]) * float(v[h, 1 + j].norm()) for h in range(attn.shape[0])) for j in range(n)]
        total, running, cdf = sum(score), 0.0, []
        for s in score:
            running += s / (total + 1e-6)
            cdf.append(running)
        ids = set()
        for i in range(kmax - 1):
            t = (2 * i + 1) / (2 * kmax)
            dist = [abs(t - c) for c in cdf]
            best = min(range(n), key=lambda j: dist[j])
            assert sorted(dist)[1] - dist[best] > 1e-6 or cdf.count(cdf[best]) > 1, "near-tie in the cdf: pick another seed"
            ids.add(best)
        ids = sorted(ids)
        return x[[0] + [1 + j for j in ids]], [tokens[j] for j in ids]

    return step


def attach_ats(model, when="always"):
    return td.attach(model, "ats", blocks=list(BLOCKS), schedule=td.Constant(0.7), when=when, relative_to="original")


def test_matches_naive_logits_kept_tokens_and_counts():
    model = deit_tiny(qk_scale=5.0)  # peaked attention: tokens sampled repeatedly, counts differ per image
    images = torch.randn(2, 3, 224, 224)
    steps = {b: ats_step(keep) for b, keep in zip(BLOCKS, targets())}
    with torch.no_grad():
        naive = [naive_forward(model, img, steps) for img in images]
        out = attach_ats(model)(images)
    torch.testing.assert_close(out, torch.stack([logits for logits, _ in naive]), atol=1e-4, rtol=0)
    records = td.last_reduction(model).records
    histories = [history for _, history in naive]
    for s, (rec, target) in enumerate(zip(records, targets())):
        counts = [len(history[s]) for history in histories]
        assert rec.kept_per_image.tolist() == counts
        assert rec.kept == max(counts) and max(counts) <= target
    assert records[0].kept_per_image.tolist() != records[0].kept_per_image.flip(0).tolist()  # padding is exercised
    assert records[2].tokens_in < targets()[2]  # the last stage samples its full budget over fewer tokens
    assert td.expected_patch_tokens(model) == targets()  # the upper bounds
    assert_records_match(records, histories)


def test_training_step_has_finite_gradients_and_when_train_keeps_evaluation():
    model = deit_tiny(qk_scale=5.0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = model(images)
    attach_ats(model, when="train")
    with torch.no_grad():
        assert torch.equal(model(images), plain)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([1, 2]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert max(float(r.kept) for r in td.last_reduction(model).records) < 196  # it did reduce in training


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="samples"):
        td.reducer("ats", samples=3)
    with pytest.raises(ValueError, match="^position"):
        td.attach(deit_tiny(), "ats", blocks=[3], position="before")


class HalveAndLog(td.Reducer):
    """Test reducer: keep the first half of the patch tokens and log the ``keep`` it was handed."""

    def __init__(self, budget):
        super().__init__()
        self.keep_is_budget = budget
        self.seen = []

    def forward(self, x, keep, inputs):
        self.seen.append(keep)
        n = (x.shape[1] - 1) // 2
        return inputs.state.select(x, torch.arange(n).expand(x.shape[0], n))


@pytest.mark.parametrize("budget,seen", [(False, [11, 7]), (True, [11, 7, 5])])
def test_a_budget_reducer_runs_with_its_uncapped_target(budget, seen):
    """Targets int(16·0.7^s) = 11, 7, 5; the tokens entering are 16, 8, 4: only a budget (ATS's sample
    count) is handed to the third site, uncapped, as the reference's fixed Kmax."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=5).eval()
    reducer = HalveAndLog(budget)
    td.attach(model, lambda facts: reducer, blocks=[1, 2, 3], schedule=td.Constant(0.7), when="always",
              relative_to="original")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert reducer.seen == seen
