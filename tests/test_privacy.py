"""Local DP: the Gaussian mechanism's noise level, clipping, and the noise actually added."""

import math

import numpy as np
import pytest

from shelora_core.privacy import clip_by_norm, gaussian_delta, gaussian_sigma, privatize


def test_classic_sigma_matches_the_textbook_formula():
    assert gaussian_sigma(10.0, 1e-5, method="classic") == pytest.approx(
        math.sqrt(2 * math.log(1.25e5)) / 10
    )


@pytest.mark.parametrize("eps", [0.5, 1.0, 10.0])
def test_analytic_sigma_is_the_smallest_that_meets_delta(eps):
    s = gaussian_sigma(eps, 1e-5)
    assert gaussian_delta(s, eps) <= 1e-5
    assert gaussian_delta(s * 0.99, eps) > 1e-5


def test_analytic_is_tighter_than_classic_where_classic_holds():
    assert gaussian_sigma(0.5, 1e-5) < gaussian_sigma(0.5, 1e-5, method="classic")


def test_classic_formula_is_not_private_enough_at_epsilon_10():
    # the textbook formula is proved for epsilon < 1 only: at the authors' epsilon = 10 its sigma
    # (0.484) misses delta = 1e-5; the analytic mechanism needs 0.4999
    classic = gaussian_sigma(10.0, 1e-5, method="classic")
    assert gaussian_delta(classic, 10.0) > 1e-5
    assert gaussian_sigma(10.0, 1e-5) == pytest.approx(0.49989, abs=1e-4)


def test_clip_scales_jointly_to_the_norm_bound():
    arrays = {"a": np.full((2, 2), 3.0), "b": np.full(1, 4.0)}  # norm sqrt(36 + 16)
    out, f = clip_by_norm(arrays, 1.0)
    assert math.sqrt(sum(np.sum(v**2) for v in out.values())) == pytest.approx(1.0)
    assert f == pytest.approx(1 / math.sqrt(52))
    same, f1 = clip_by_norm(arrays, 100.0)
    assert f1 == 1.0 and np.array_equal(same["a"], arrays["a"])


def test_privatize_adds_noise_of_the_calibrated_std():
    x = {"w": np.zeros(200_000)}
    out = privatize(x, max_norm=2.0, epsilon=10.0, delta=1e-5, rng=np.random.default_rng(0))
    assert out["w"].std() == pytest.approx(2.0 * gaussian_sigma(10.0, 1e-5), rel=0.01)


@pytest.mark.parametrize(
    ("eps", "delta", "msg"), [(0, 1e-5, "epsilon"), (1, 0, "delta"), (1, 1.5, "delta")]
)
def test_bad_privacy_parameters_raise(eps, delta, msg):
    with pytest.raises(ValueError, match=msg):
        gaussian_sigma(eps, delta)


def test_privatize_update_clips_the_whole_update_and_is_seeded():
    from shelora_core.adapters import AdapterWeights
    from shelora_core.methods.dp import privatize_update

    start = AdapterWeights(2, 16.0, {"l": (np.zeros((3, 2)), np.zeros((2, 4)))}, {"w": np.zeros(2)})
    after = AdapterWeights(
        2, 16.0, {"l": (np.full((3, 2), 3.0), np.zeros((2, 4)))}, {"w": np.full(2, 4.0)}
    )

    clipped = privatize_update(after, start, clip=1.0, noise_multiplier=0.0)
    a = privatize_update(after, start, clip=1.0, noise_multiplier=0.5, seed=7)
    b = privatize_update(after, start, clip=1.0, noise_multiplier=0.5, seed=7)
    c = privatize_update(after, start, clip=1.0, noise_multiplier=0.5, seed=8)

    norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in
                       (*clipped.factors["l"], clipped.head["w"])))  # fmt: skip
    assert norm == pytest.approx(1.0, rel=1e-6)  # 6 x 3^2 + 2 x 4^2 = 86 -> scaled to 1
    np.testing.assert_array_equal(a.factors["l"][1], b.factors["l"][1])
    assert not np.array_equal(a.factors["l"][1], c.factors["l"][1])
    with pytest.raises(ValueError, match="exactly one of noise_multiplier"):
        privatize_update(after, start, clip=1.0)
