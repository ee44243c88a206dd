"""Task mixtures: each strategy's rates against its formula, and the sampler's draws against the rates.

The sampler is stratified (cumulative rounding, data/mixture.py), so the tolerance is tight: over any whole number
of mixture epochs, each task's draw count is within one example of epochs x N x rate_i (a multinomial sampler
would be off by ~sqrt(draws), ~50 of 10k, and fail these checks).
"""

import math
from collections import Counter

import pytest

from sftlab.data.mixture import Mixture, mixture_rates, mixture_table


def _mixture(sizes, strategy="proportional", **kw) -> Mixture:
    rates = mixture_rates(sizes, strategy, **kw)
    names = tuple(f"t{i}" for i in range(len(sizes)))
    return Mixture(names, tuple(sizes), tuple(rates), (1.0,) * len(sizes), strategy)


def _draws(m: Mixture, at_least: int, seed: int = 0) -> tuple[list[int], int]:
    """Draws of whole epochs until at least `at_least`; (task of each draw, epochs used)."""
    tasks, e = [], 0
    bounds = m.offsets + [m.total]
    while len(tasks) < at_least:
        for g in m.epoch_draws(seed, e):
            tasks.append(next(i for i in range(len(m.sizes)) if bounds[i] <= g < bounds[i + 1]))
        e += 1
    return tasks, e


# ---- rates: the formulas --------------------------------------------------------------------------------


def test_proportional_rates_are_example_shares():
    assert mixture_rates([100, 300, 600]) == pytest.approx([0.1, 0.3, 0.6])


def test_cap_limits_big_tasks_like_t5():
    # rate_i ∝ min(n_i, K): with K = 200 the 300- and 600-example tasks both count as 200
    assert mixture_rates([100, 300, 600], cap=200) == pytest.approx([100 / 500, 200 / 500, 200 / 500])
    # a cap above every size changes nothing
    assert mixture_rates([100, 300, 600], cap=10_000) == pytest.approx(mixture_rates([100, 300, 600]))


def test_temperature_rates():
    sizes = [100, 300, 600]
    t = 2.0
    mass = [n ** (1 / t) for n in sizes]
    assert mixture_rates(sizes, "temperature", temperature=t) == pytest.approx([m / sum(mass) for m in mass])
    # T = 1 is proportional; T -> infinity tends to equal
    assert mixture_rates(sizes, "temperature", temperature=1.0) == pytest.approx(mixture_rates(sizes))
    assert mixture_rates(sizes, "temperature", temperature=1e9) == pytest.approx([1 / 3] * 3, abs=1e-8)
    # the cap applies before the temperature (T5's order)
    capped = [min(n, 200) ** 0.5 for n in sizes]
    got = mixture_rates(sizes, "temperature", temperature=2.0, cap=200)
    assert got == pytest.approx([m / sum(capped) for m in capped])


def test_equal_and_weights_rates():
    assert mixture_rates([5, 5000, 50], "equal") == pytest.approx([1 / 3] * 3)
    assert mixture_rates([5, 5000, 50], "weights", weights=[1, 2, 5]) == pytest.approx([1 / 8, 2 / 8, 5 / 8])


def test_one_task_gets_everything():
    for strategy, kw in [("proportional", {}), ("temperature", {"temperature": 3.0}), ("equal", {}),
                         ("weights", {"weights": [0.2]}), ("proportional", {"cap": 3})]:  # fmt: skip
        assert mixture_rates([7], strategy, **kw) == [1.0]


def test_bad_rate_inputs_raise():
    with pytest.raises(ValueError, match="at least one example"):
        mixture_rates([3, 0])
    with pytest.raises(ValueError, match="temperature"):
        mixture_rates([3, 4], "temperature")
    with pytest.raises(ValueError, match="weight"):
        mixture_rates([3, 4], "weights", weights=[1.0])
    with pytest.raises(ValueError, match="not one of"):
        mixture_rates([3, 4], "uniform")


# ---- the sampler: shares over 10k draws ------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy,kw",
    [
        ("proportional", {}),
        ("proportional", {"cap": 150}),
        ("temperature", {"temperature": 2.0}),
        ("temperature", {"temperature": 0.5}),
        ("equal", {}),
        ("weights", {"weights": [3.0, 1.0, 0.5]}),
    ],
)
def test_sampled_shares_match_the_rates(strategy, kw):
    m = _mixture([40, 300, 7], strategy, **kw)
    tasks, epochs = _draws(m, 10_000)
    counts = Counter(tasks)
    for i, r in enumerate(m.rates):
        expected = epochs * m.total * r
        assert abs(counts[i] - expected) <= 1.0, (i, counts[i], expected)  # within one example per task
    assert abs(counts[0] / len(tasks) - m.rates[0]) < 1e-3


def test_a_tiny_task_is_drawn_at_its_rate_not_rounded_away():
    # rate 1/2001 of 2001 draws per epoch: under one draw an epoch at times, but the share carries over
    m = _mixture([2000, 1], "weights", weights=[4000.0, 1.0])
    tasks, epochs = _draws(m, 10_000)
    expected = epochs * m.total * m.rates[1]
    assert 0 < expected < epochs  # fewer than one draw per epoch on average
    assert abs(Counter(tasks)[1] - expected) <= 1.0
    # ... and proportional mixing draws a one-example task exactly once per epoch
    m = _mixture([500, 1])
    assert [m.epoch_counts(e) for e in range(3)] == [[500, 1]] * 3


def test_temperature_lifts_a_tiny_task():
    sizes = [5000, 5]
    prop = _mixture(sizes)
    hot = _mixture(sizes, "temperature", temperature=4.0)
    assert hot.rates[1] > 10 * prop.rates[1]
    assert sum(hot.epoch_counts(0)) == pytest.approx(sum(sizes), abs=len(sizes))
    assert hot.epoch_counts(0)[1] >= 5 * sizes[1]  # the tiny task is cycled many times per mixture epoch


def test_each_pass_over_a_task_sees_every_example_once():
    m = _mixture([7, 50], "equal")  # task 0 is drawn ~3.6 times per mixture epoch
    seq = [g for e in range(6) for g in m.epoch_draws(3, e) if g < 7]
    for start in range(0, len(seq) - 7 + 1, 7):
        assert sorted(seq[start : start + 7]) == list(range(7))
    passes = [tuple(seq[s : s + 7]) for s in range(0, 21, 7)]
    assert len(set(passes)) > 1  # a fresh order per pass


def test_one_task_epoch_is_a_permutation_of_its_examples():
    m = _mixture([37])
    for e in range(3):
        assert sorted(m.epoch_draws(0, e)) == list(range(37))


def test_draws_are_a_pure_function_of_seed_and_epoch():
    m = _mixture([30, 20, 9], "temperature", temperature=2.0)
    assert m.epoch_draws(5, 4) == _mixture([30, 20, 9], "temperature", temperature=2.0).epoch_draws(5, 4)
    assert m.epoch_draws(5, 4) != m.epoch_draws(6, 4)
    # epoch 4 straight equals epoch 4 after computing others (no hidden state)
    first = m.epoch_draws(5, 4)
    for e in range(4):
        m.epoch_draws(5, e)
    assert m.epoch_draws(5, 4) == first


def test_table_lists_each_task_with_its_share_and_epochs():
    m = _mixture([100, 300])
    out = mixture_table(m, 2.0, supervised=[1000, 1000])
    lines = out.splitlines()
    assert "proportional" in lines[0] and "2 mixture epochs of 400 examples" in lines[0]
    t0 = lines[2].split()
    assert t0[0] == "t0" and t0[1] == "100" and t0[2] == "25.0%" and math.isclose(float(t0[4]), 2.0)
    # task 0 has 10 supervised tokens per example, task 1 3.33: t0 holds 0.25*10 / (0.25*10 + 0.75*3.33) = 50%
    assert lines[2].endswith("50.0%") and lines[3].endswith("50.0%")
