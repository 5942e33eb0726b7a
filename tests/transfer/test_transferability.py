"""Transferability estimators: LogME against a direct evaluation of the evidence, known behaviour of
LogME and GBC, and the per-task-type feature/label pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gppf.interfaces import Batch, Features
from gppf.transfer import transferability as tr


def _mackay(f: np.ndarray, y: np.ndarray, iters: int = 500) -> float:
    """Evidence maximisation done the plain way (explicit A, m; eigenvalues of f^T f), then the evidence
    formula evaluated directly: an independent reference for ``logme`` on one column. The updates carry the
    reference implementation's 1e-5 in their denominators (it matters when N < D: the fit is near exact)."""
    n, d = f.shape
    eig = np.linalg.eigvalsh(f.T @ f)
    alpha, beta = 1.0, 1.0
    for _ in range(iters):
        a = alpha * np.eye(d) + beta * f.T @ f
        m = beta * np.linalg.solve(a, f.T @ y)
        gamma = float((beta * eig / (alpha + beta * eig)).sum())
        alpha, beta = gamma / (float(m @ m) + 1e-5), (n - gamma) / (float(((y - f @ m) ** 2).sum()) + 1e-5)
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - beta / 2 * ((f @ m - y) ** 2).sum()
          - alpha / 2 * m @ m - np.linalg.slogdet(a)[1] / 2 - n / 2 * np.log(2 * np.pi))
    return float(ev / n)


def _informative(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 2.0
    return centres[y] + rng.normal(size=(n, d)), y


@pytest.mark.parametrize("n,d", [(200, 16), (30, 50)])
def test_logme_equals_direct_evidence_maximum(n: int, d: int) -> None:
    f, y = _informative(n, d, classes=3, seed=n)
    columns = [(y == c).astype(np.float64) for c in range(3)]
    expected = np.mean([_mackay(f, col) for col in columns])
    assert tr.logme(f, y, max_iter=1000, tol=1e-12) == pytest.approx(expected, rel=1e-5)
    assert tr.logme(f, y) == pytest.approx(expected, rel=2e-3)  # the reference's 11 iterations


def test_logme_evidence_is_a_maximum_in_alpha_beta() -> None:
    f, y = _informative(120, 10, classes=2, seed=3)
    col = (y == 1).astype(np.float64)
    best = _mackay(f, col)
    for a, b in [(0.5, 1.0), (2.0, 1.0), (1.0, 0.5), (1.0, 2.0)]:
        # the optimum of the direct formula: moving alpha or beta away lowers it
        alpha, beta = _fit(f, col)
        assert tr.logme_evidence(f, col, alpha * a, beta * b) < best
    assert tr.logme_evidence(f, col, *_fit(f, col)) == pytest.approx(best, rel=1e-6)


def _fit(f: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    _, alpha, beta = tr._column_evidence(u.T @ y, float(y @ y), s**2, len(f), f.shape[1], 1000, 1e-12)
    return alpha, beta


def test_logme_informative_above_random_and_permutation_lowers() -> None:
    f, y = _informative(256, 32, classes=4)
    rng = np.random.default_rng(1)
    informative = tr.logme(f, y)
    assert informative > tr.logme(rng.normal(size=f.shape), y) + 0.1
    assert informative > tr.logme(f, rng.permutation(y)) + 0.1
    assert tr.logme(torch.tensor(f), torch.tensor(y)) == pytest.approx(informative)  # tensors accepted


def test_logme_multilabel_is_mean_over_label_columns() -> None:
    f, y = _informative(100, 8, classes=2)
    y_NC = np.stack([y, 1 - y, (f[:, 0] > 0)], 1).astype(np.float64)
    per_column = [tr.logme(f, y_NC[:, [c]]) for c in range(3)]
    assert tr.logme(f, y_NC) == pytest.approx(np.mean(per_column))


def test_gbc_separable_above_overlapping() -> None:
    f, y = _informative(300, 16, classes=3)
    rng = np.random.default_rng(2)
    separable = tr.gbc(f, y)
    assert separable <= 0.0
    assert separable > tr.gbc(f * 0.2 + rng.normal(size=f.shape), y) + 0.5
    assert separable > tr.gbc(f, rng.permutation(y)) + 1.0
    assert tr.gbc(rng.normal(size=f.shape), y) < -5.0  # 3 classes, 6 ordered pairs, all overlapping: ~ -6


def test_estimator_table_and_plugin_error() -> None:
    assert set(tr.ESTIMATORS) == {"classification", "multilabel", "detection", "segmentation", "keypoints", "reid"}
    with pytest.raises(tr.TransferabilityError, match="'my_plugin_type'"):
        tr.estimator_for("my_plugin_type")
    assert tr.estimator_for("segmentation", score="gbc").score is tr.gbc
    with pytest.raises(tr.TransferabilityError, match="unknown transferability score"):
        tr.estimator_for("classification", score="nope")


def _grid_features(b: int, h: int, w: int) -> Features:
    """Stride-8 level whose channel 0 is the cell's row and channel 1 its column."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    level = torch.stack([rows, cols])[None].expand(b, -1, -1, -1).contiguous()
    return Features(pyramid=[level, level, level, level], pooled=torch.zeros(b, 2))


def test_pairs_pixels_labels_match_cell_centres() -> None:
    feats = _grid_features(2, 4, 4)
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    mask = ((ys // 8) * 10 + xs // 8)[None].repeat(2, 1, 1)
    mask[1, :8] = 255  # ignored first cell row of image 1
    batch = Batch(images=torch.zeros(2, 3, 32, 32), targets=[{}, {}], stacked={"mask": mask})
    rows, labels = tr.pairs_pixels(feats, batch, generator=torch.Generator().manual_seed(0))
    assert len(rows) == 16 + 12
    assert torch.equal(labels, (rows[:, 0] * 10 + rows[:, 1]).long())


def test_pairs_boxes_pool_inside_each_box() -> None:
    level = torch.ones(1, 1, 8, 8)
    level[..., 4:] = 5.0  # right half of a 64 px image (stride 8)
    feats = Features(pyramid=[level, level, level, level], pooled=torch.zeros(1, 1))
    target = {"boxes": torch.tensor([[0.0, 0.0, 24.0, 24.0], [40.0, 8.0, 64.0, 56.0]]), "labels": torch.tensor([3, 7])}
    rows, labels = tr.pairs_boxes(feats, Batch(images=torch.zeros(1, 3, 64, 64), targets=[target]))
    assert labels.tolist() == [3, 7]
    assert rows.shape == (2, 2)  # two levels, one channel each
    assert torch.allclose(rows, torch.tensor([[1.0, 1.0], [5.0, 5.0]]))


def test_pairs_keypoints_sample_at_locations_and_skip_invisible() -> None:
    feats = _grid_features(1, 4, 4)  # channel 1: column index of the stride-8 cell
    kp = torch.tensor([[[12.0, 4.0, 2.0], [20.0, 20.0, 1.0], [5.0, 5.0, 0.0]]])  # third is invisible
    rows, ids = tr.pairs_keypoints(feats, Batch(images=torch.zeros(1, 3, 32, 32), targets=[{"keypoints": kp[0]}]))
    assert ids.tolist() == [0, 1]
    assert torch.allclose(rows[:, 1], torch.tensor([12.0 / 8 - 0.5, 20.0 / 8 - 0.5]))
