"""care_megatron.stats: the exact Student-t quantile and the interval over seeds, against tables,
hand-computed values and scipy."""
import pytest

from care_megatron import stats


@pytest.mark.parametrize("dof, expected", [(1, 12.706204736174707), (2, 4.302652729749464), (4, 2.7764451051977934),
                                           (9, 2.2621571628540993), (30, 2.0422724563012373)])
def test_t_quantile_matches_tables(dof, expected):
    assert stats.student_t_quantile(0.975, dof) == pytest.approx(expected, rel=1e-9)
    assert stats.student_t_quantile(0.025, dof) == pytest.approx(-expected, rel=1e-9)


def test_interval_hand_computed():
    # three seeds 0.30 / 0.35 / 0.40: mean 0.35, sample sd 0.05, se 0.05 / sqrt(3),
    # half width t(0.975, 2) * se = 4.302652729749464 * 0.028867513459481287 = 0.124206886...
    stat = stats.mean_interval([0.30, 0.35, 0.40])
    assert stat["mean"] == pytest.approx(0.35)
    assert stat["half_width"] == pytest.approx(0.1242068856, rel=1e-9)
    assert (stat["low"], stat["high"]) == pytest.approx((0.35 - 0.1242068856, 0.35 + 0.1242068856), rel=1e-9)
    assert stats.mean_interval([0.5])["half_width"] is None and stats.mean_interval([])["mean"] is None


def test_interval_agrees_with_scipy_when_present():
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in (1, 3, 7, 50):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert stats.student_t_quantile(p, dof) == pytest.approx(scipy_stats.t.ppf(p, dof), rel=1e-8)
