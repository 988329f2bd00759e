import math

import pytest

import tokendrop as td
from reference import drop_ratio as closed_form


@pytest.mark.parametrize("t, expected", [(0, 0.0), (39, 0.0), (40, 0.0), (90, 0.0875), (140, 0.35), (199, 0.35)])
def test_ptd_curriculum_values(t, expected):
    assert td.Curriculum(40, 140, final=0.35, gamma=2.0)(t) == pytest.approx(expected, abs=1e-12)


def test_curriculum_matches_closed_form_everywhere():
    for gamma in (0.5, 1.0, 1.5, 2.0, 3.0):
        sched = td.Curriculum(20, 160, initial=0.05, final=0.35, gamma=gamma)
        for t in [i * 0.37 for i in range(600)]:
            assert sched(t) == pytest.approx(closed_form(t, 20, 160, 0.05, 0.35, gamma), abs=1e-12)


@pytest.mark.parametrize("d, k", [(0.0, 256), (0.0875, 233), (0.35, 166)])
def test_keep_count(d, k):
    assert td.keep_count(256, d) == k


def test_constant_keep_counts_are_exact():
    from fractions import Fraction

    for percent in range(1, 101):
        rate = percent / 100
        for n in range(1, 300):
            expected = max(1, int(Fraction(percent, 100) * n))
            assert td.keep_count(n, td.Constant(rate)(0)) == expected, (rate, n)


def test_keep_count_never_zero():
    assert td.keep_count(4, 0.99) == 1


def test_shapes():
    lin, cos, step = td.Linear(10, 20, final=0.4), td.Cosine(10, 20, final=0.4), td.Step(10, 20, final=0.4, steps=4)
    assert lin(15) == pytest.approx(0.2)
    assert cos(15) == pytest.approx(0.2)
    assert cos(12.5) == pytest.approx(0.4 * (1 - math.cos(math.pi * 0.25)) / 2)
    assert step(12.4) == pytest.approx(0.0) and step(12.5) == pytest.approx(0.1) and step(19.99) == pytest.approx(0.3)
    for s in (lin, cos, step):
        assert s(5) == 0.0 and s(20) == pytest.approx(0.4) and s(30) == pytest.approx(0.4)
    assert td.Constant(0.7)(123) == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs, name", [
    (dict(start=40, end=140, final=1.0), "final"),
    (dict(start=40, end=140, final=-0.1), "final"),
    (dict(start=40, end=40), "end"),
    (dict(start=50, end=40), "end"),
    (dict(start=40, end=140, gamma=0.0), "gamma"),
    (dict(start=40, end=140, gamma=-1.0), "gamma"),
    (dict(start=40, end=140, initial=1.5), "initial"),
])
def test_bad_curriculum_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: .*(range|greater)"):
        td.Curriculum(**kwargs)


def test_bad_constant_and_kind():
    with pytest.raises(ValueError, match=r"keep_rate: .*\(0, 1\]"):
        td.Constant(0.0)
    with pytest.raises(ValueError, match="schedule: unknown"):
        td.make_schedule("exponential")


@pytest.mark.parametrize("keep_rate", [0.7, 0.65, 0.5, 0.33])
def test_constant_means_the_same_in_config_and_api(keep_rate):
    """`schedule: constant` with token_drop.keep_rate keeps what td.Constant(keep_rate) keeps: through the
    trainer's schedule builder and through a model with its sites attached from the config."""
    from fractions import Fraction

    from tokendrop.train.config import load_config
    from tokendrop.train.trainer import build_run_model, token_drop_schedule

    cfg = load_config("fashion_mnist_ptd", ["token_drop.schedule=constant", f"token_drop.keep_rate={keep_rate}",
                                            "data.dataset=digits"])
    from_config, from_api = token_drop_schedule(cfg), td.Constant(keep_rate)
    expected = int(Fraction(str(keep_rate)) * 64)  # hybrid_vit_tiny at 32 px: 64 patch tokens
    for epoch in (0, 3.5, 9):
        assert td.keep_count(64, from_config(epoch)) == td.keep_count(64, from_api(epoch)) == expected
    model = build_run_model(cfg, num_classes=10, in_chans=1, img_size=32)
    api_model = td.build_model("hybrid_vit_tiny", num_classes=10, in_chans=1, img_size=32)
    td.attach(api_model, td.TopK("cls_attention"), blocks=[0], schedule=from_api, when="train")
    for m in (model, api_model):
        td.set_epoch(m, 5)
    assert td.expected_patch_tokens(model, training=True) == td.expected_patch_tokens(api_model, training=True) == [expected]


def test_constant_schedule_does_not_read_final():
    from tokendrop.train.config import ConfigError, load_config

    # fashion_mnist_ptd sets token_drop.final: a constant schedule on it must say which key it reads
    with pytest.raises(ConfigError) as e:
        load_config("fashion_mnist_ptd", ["token_drop.schedule=constant"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("token_drop.final: ")
    assert "token_drop.keep_rate=0.65" in msg and "0.35" in msg
    with pytest.raises(ConfigError, match="keep_rate=0.8 for a drop ratio of 0.2"):
        load_config("fashion_mnist_baseline", ["token_drop.schedule=constant", "token_drop.final=0.2"])
    # no final given: the default keep rate; keep_rate given: final is simply not read
    assert load_config("fashion_mnist_baseline", ["token_drop.schedule=constant"]).token_drop.keep_rate == 0.65
    cfg = load_config("fashion_mnist_ptd", ["token_drop.schedule=constant", "token_drop.keep_rate=0.9"])
    assert td.make_schedule("constant", keep_rate=cfg.token_drop.keep_rate, final=0.35)(0) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"token_drop.keep_rate: 0.0 is outside the allowed range \(0.0, 1.0\]"):
        load_config("fashion_mnist_ptd", ["token_drop.schedule=constant", "token_drop.keep_rate=0"])
    with pytest.raises(ValueError, match="keep_rate: a constant schedule needs keep_rate"):
        td.make_schedule("constant", final=0.35)
