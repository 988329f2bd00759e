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
