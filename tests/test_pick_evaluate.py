import numpy as np

from cryopipe.picking.evaluate import match_picks, score_picks


def test_one_to_one_matching():
    truth = np.array([[100.0, 100.0], [200.0, 200.0], [300.0, 100.0]])
    picks = np.array([[101.0, 100.0], [99.0, 101.0], [205.0, 200.0], [500.0, 500.0]])
    s = score_picks(picks, truth, tolerance_px=10)
    # two picks on particle 0 count once; the far pick is a false positive; particle 2 is missed
    assert (s.n_picks, s.n_true, s.n_matched) == (4, 3, 2)
    assert s.precision == 0.5 and abs(s.recall - 2 / 3) < 1e-12
    assert abs(s.f1 - 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)) < 1e-12


def test_maximal_matching_not_greedy():
    # greedy nearest-first would give pick 0 to truth 1 and leave truth 0 unmatched
    truth = np.array([[0.0, 0.0], [8.0, 0.0]])
    picks = np.array([[5.0, 0.0], [14.0, 0.0]])
    assert len(match_picks(picks, truth, tolerance_px=6)) == 2


def test_empty_and_sum():
    assert score_picks(np.zeros((0, 2)), np.ones((3, 2)), 5).recall == 0.0
    a = score_picks(np.array([[0.0, 0.0]]), np.array([[0.0, 1.0]]), 2)
    b = score_picks(np.array([[9.0, 9.0]]), np.array([[0.0, 1.0]]), 2)
    assert (a + b).n_matched == 1 and (a + b).n_picks == 2
