"""Transferability estimators: how well frozen features suit a new task's labels, before any training.

Scores (higher = more transferable; only comparable between feature sets scored on the same samples):

* ``logme(f_ND, y)``: LogME (You et al., ICML 2021; fixed-point form of You et al., JMLR 2022,
  arXiv:2110.10545, as in github.com/thuml/LogME). Each target column ``y_c`` (one-hot class indicator,
  or a real-valued column) gets a Bayesian linear model ``y_c = f w + noise``, prior ``w ~ N(0, 1/alpha)``,
  noise ``N(0, 1/beta)``; ``alpha, beta`` maximise the marginal likelihood (evidence) by the fixed-point
  updates ``alpha = gamma / |m|^2``, ``beta = (N - gamma) / |f m - y|^2`` with ``gamma = sum s_i / (s_i +
  alpha / beta)``, ``s_i`` the eigenvalues of ``f^T f`` from ONE SVD of ``f`` shared by every column. The
  score is the maximised log evidence divided by ``N``, averaged over the columns. Difference to the
  reference code: the evidence's ``-1/2 log|alpha I + beta f^T f|`` counts the ``D - rank`` zero eigenvalues
  as ``log alpha`` (the reference drops them when ``N < D``), and the final evidence is evaluated with ``m``
  at the final ``alpha, beta`` (the reference re-uses the previous iterate's residual), so the value is
  exactly the evidence formula at the returned ``alpha, beta``.
* ``gbc(f_ND, y_N)``: Gaussian Bhattacharyya Coefficient (Pandy et al., CVPR 2022): each class is a
  Gaussian with diagonal covariance in the (PCA-reduced) feature space; the score is minus the sum over
  ordered class pairs of ``exp(-D_B)``, ``D_B`` the Bhattacharyya distance (0 = fully separable).

Dense tasks are reduced to such (feature row, label) pairs by ``ESTIMATORS`` (one entry per task type, see
``pairs_*``): classification / reid: pooled features vs class / identity; multilabel: pooled features vs the
label matrix (LogME averages the per-label evidence); segmentation: stride-8 pyramid features at sampled
pixels vs the pixel's class; detection: stride-8 and stride-16 features ``roi_align``-pooled inside each
ground-truth box vs the box's class; keypoints: stride-8 features at each visible keypoint vs the keypoint id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from gppf.interfaces import Batch, Features

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "TransferabilityError",
    "estimator_for",
    "gbc",
    "logme",
    "logme_evidence",
]

PIXELS_PER_IMAGE = 64
"""Pixels sampled per image for segmentation (stride-8 cells, ignore label excluded)."""


class TransferabilityError(ValueError):
    """A task type without an estimator, or data an estimator cannot score."""


# ---------------------------------------------------------------------------------------------- LogME
def logme_evidence(f_ND: np.ndarray, y_N: np.ndarray, alpha: float, beta: float) -> float:
    """The log evidence ``log p(y | f, alpha, beta)`` / N of Bayesian linear regression, evaluated directly
    (``A = alpha I + beta f^T f``, ``m = beta A^-1 f^T y``); used to check ``logme`` and by hand."""
    n, d = f_ND.shape
    a_DD = alpha * np.eye(d) + beta * f_ND.T @ f_ND
    m_D = beta * np.linalg.solve(a_DD, f_ND.T @ y_N)
    _, logdet = np.linalg.slogdet(a_DD)
    res = float(((f_ND @ m_D - y_N) ** 2).sum())
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - beta / 2 * res - alpha / 2 * float(m_D @ m_D)
          - logdet / 2 - n / 2 * np.log(2 * np.pi))
    return float(ev / n)


def _column_evidence(x_K: np.ndarray, yy: float, sigma_K: np.ndarray, n: int, d: int,
                     max_iter: int, tol: float = 1e-3) -> tuple[float, float, float]:
    """Fixed-point evidence maximisation of one target column (``x = u^T y``, ``yy = |y|^2``)."""
    x2 = x_K ** 2
    res_x2 = yy - x2.sum()  # the part of y outside the column space of f
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = (sigma_K / (sigma_K + t)).sum()
        m2 = (sigma_K * x2 / (t + sigma_K) ** 2).sum()
        res2 = (x2 / (1 + sigma_K / t) ** 2).sum() + res_x2
        alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        if abs(alpha / beta - t) / t <= tol:
            break
    t = alpha / beta
    m2 = (sigma_K * x2 / (t + sigma_K) ** 2).sum()
    res2 = (x2 / (1 + sigma_K / t) ** 2).sum() + res_x2
    logdet = np.log(alpha + beta * sigma_K).sum() + (d - len(sigma_K)) * np.log(alpha)
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2
          - n / 2 * np.log(2 * np.pi))
    return float(ev / n), float(alpha), float(beta)


def logme(f_ND: np.ndarray | Tensor, y: np.ndarray | Tensor, *, max_iter: int = 11, tol: float = 1e-3) -> float:
    """LogME of features ``f_ND`` for labels ``y``: int class ids ``[N]`` (one indicator column per class
    present) or real targets ``[N, C]`` (e.g. a multilabel 0/1 matrix); mean per-sample log evidence.
    ``max_iter`` / ``tol`` (relative change of ``alpha / beta``): the reference's stopping rule."""
    f = np.asarray(torch.as_tensor(f_ND).detach().cpu().double().numpy(), dtype=np.float64)
    y_arr = np.asarray(torch.as_tensor(y).detach().cpu().numpy())
    if y_arr.ndim == 1:
        classes = np.unique(y_arr)
        y_NC = (y_arr[:, None] == classes[None, :]).astype(np.float64)
    else:
        y_NC = y_arr.astype(np.float64)
    n, d = f.shape
    if n < 2 or y_NC.shape[0] != n:
        raise TransferabilityError(f"LogME needs >= 2 samples with one label each, got f {f.shape}, y {y_arr.shape}")
    u_NK, s_K, _ = np.linalg.svd(f, full_matrices=False)  # one SVD for every column
    keep = s_K > 1e-10 * max(float(s_K.max(initial=0.0)), 1e-300)
    u_NK, sigma_K = u_NK[:, keep], s_K[keep] ** 2
    x_KC = u_NK.T @ y_NC
    yy_C = (y_NC ** 2).sum(0)
    evidences = [_column_evidence(x_KC[:, c], float(yy_C[c]), sigma_K, n, d, max_iter, tol)[0]
                 for c in range(y_NC.shape[1])]
    return float(np.mean(evidences))


# ---------------------------------------------------------------------------------------------- GBC
def gbc(f_ND: np.ndarray | Tensor, y_N: np.ndarray | Tensor, *, dims: int = 64) -> float:
    """Gaussian Bhattacharyya Coefficient: ``-sum_{i != j} exp(-D_B(c_i, c_j))`` over classes, each a
    diagonal Gaussian in the first ``dims`` principal components of ``f`` (higher = more separable)."""
    f = torch.as_tensor(f_ND).detach().cpu().double()
    y = torch.as_tensor(y_N).detach().cpu().long().reshape(-1)
    f = f - f.mean(0, keepdim=True)
    q = min(dims, *f.shape)
    _, _, v_DQ = torch.pca_lowrank(f, q=q, center=False)
    z = f @ v_DQ
    classes = [c for c in torch.unique(y).tolist() if int((y == c).sum()) >= 2]
    if len(classes) < 2:
        raise TransferabilityError("GBC needs two classes with >= 2 samples each")
    mu = torch.stack([z[y == c].mean(0) for c in classes])
    var = torch.stack([z[y == c].var(0, unbiased=False) for c in classes]) + 1e-6
    total = 0.0
    for i in range(len(classes)):
        for j in range(len(classes)):
            if i == j:
                continue
            v = (var[i] + var[j]) / 2
            db = ((mu[i] - mu[j]) ** 2 / v).sum() / 8 + 0.5 * (
                torch.log(v).sum() - 0.5 * (torch.log(var[i]).sum() + torch.log(var[j]).sum()))
            total += float(torch.exp(-db))
    return -total


# ---------------------------------------------------------------------------------------------- pairs
Pairs = tuple[Tensor, Tensor]
"""(feature rows ``[n, D]``, labels ``[n]`` or ``[n, C]``)."""


def pairs_pooled(feats: Features, batch: Batch, key: str) -> Pairs:
    """Pooled features vs ``batch.stacked[key]`` (class, identity or label matrix)."""
    return feats.pooled.float(), batch.stacked[key].to(feats.pooled.device)


def pairs_pixels(feats: Features, batch: Batch, *, generator: torch.Generator, level: int = 1,
                 ignore: int = 255) -> Pairs:
    """Pyramid level ``level`` (stride 8) features at up to ``PIXELS_PER_IMAGE`` sampled cells per image vs
    the class of the cell's centre pixel (``ignore`` excluded)."""
    fmap = feats.pyramid[level].float()
    b, c, h, w = fmap.shape
    mask = batch.stacked["mask"].to(fmap.device)
    stride_y, stride_x = mask.shape[-2] // h, mask.shape[-1] // w
    cell_labels = mask[:, stride_y // 2::stride_y, stride_x // 2::stride_x][:, :h, :w].reshape(b, -1)
    rows, labels = [], []
    flat = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
    for i in range(b):
        valid = torch.nonzero(cell_labels[i] != ignore).flatten()
        pick = valid[torch.randperm(len(valid), generator=generator)[:PIXELS_PER_IMAGE].to(valid.device)]
        rows.append(flat[i, pick])
        labels.append(cell_labels[i, pick])
    return torch.cat(rows), torch.cat(labels).long()


def pairs_boxes(feats: Features, batch: Batch, *, levels: tuple[int, ...] = (1, 2)) -> Pairs:
    """Features ``roi_align``-pooled inside each ground-truth box (pyramid ``levels``, concatenated) vs
    the box's class."""
    from gppf.heads.detection import target_boxes

    boxes = [target_boxes(t).to(feats.pooled.device) for t in batch.targets]
    labels = torch.cat([torch.as_tensor(t["labels"]).reshape(-1).long() for t in batch.targets])
    if not len(labels):
        return feats.pooled.new_zeros((0, sum(feats.pyramid[i].shape[1] for i in levels))), labels
    size = batch.images.shape[-1]
    cols = []
    for lvl in levels:
        fmap = feats.pyramid[lvl].float()
        pooled = roi_align(fmap, boxes, output_size=2, spatial_scale=fmap.shape[-1] / size, aligned=True)
        cols.append(pooled.mean(dim=(2, 3)))
    return torch.cat(cols, 1), labels.to(feats.pooled.device)


def pairs_keypoints(feats: Features, batch: Batch, *, level: int = 1) -> Pairs:
    """Stride-8 features bilinearly sampled at every visible in-image keypoint vs the keypoint's id."""
    from gppf.heads.keypoints import target_keypoints

    fmap = feats.pyramid[level].float()
    kp = target_keypoints(batch.targets).to(fmap.device)  # [B, K, 3]
    size_y, size_x = batch.images.shape[-2:]
    x, y = kp[..., 0], kp[..., 1]
    ok = (kp[..., 2] > 0) & (x >= 0) & (x < size_x) & (y >= 0) & (y < size_y)
    grid = torch.stack([x / size_x * 2 - 1, y / size_y * 2 - 1], -1)[:, :, None]  # [B, K, 1, 2]
    sampled = F.grid_sample(fmap, grid, align_corners=False).squeeze(-1).transpose(1, 2)  # [B, K, C]
    ids = torch.arange(kp.shape[1], device=fmap.device).expand(kp.shape[0], -1)
    return sampled[ok], ids[ok]


# ---------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Estimator:
    """How a task type is scored: ``pairs(feats, batch, generator)`` -> rows and labels, ``score`` on them."""

    method: str
    pairs: Callable[[Features, Batch, torch.Generator], Pairs]
    score: Callable[[Any, Any], float]


ESTIMATORS: dict[str, Estimator] = {
    "classification": Estimator("logme(pooled, class)", lambda f, b, g: pairs_pooled(f, b, "label"), logme),
    "reid": Estimator("logme(pooled, identity)", lambda f, b, g: pairs_pooled(f, b, "identity"), logme),
    "multilabel": Estimator("logme(pooled, mean over labels)",
                            lambda f, b, g: pairs_pooled(f, b, "labels"), logme),
    "segmentation": Estimator("logme(stride-8 pixels, class)",
                              lambda f, b, g: pairs_pixels(f, b, generator=g), logme),
    "detection": Estimator("logme(roi_align boxes s8+s16, class)", lambda f, b, g: pairs_boxes(f, b), logme),
    "keypoints": Estimator("logme(stride-8 at keypoints, keypoint id)",
                           lambda f, b, g: pairs_keypoints(f, b), logme),
}
"""Task type -> its estimator (LogME on the type's feature/label pairs). GBC is the alternative score
(``SCORES``) for single-label types."""

SCORES: Mapping[str, Callable[[Any, Any], float]] = {"logme": logme, "gbc": gbc}


def estimator_for(task_type: str, *, score: str | None = None) -> Estimator:
    """The estimator of ``task_type``; ``score`` ("logme" / "gbc") replaces its score function."""
    if task_type not in ESTIMATORS:
        raise TransferabilityError(
            f"no transferability estimator for task type '{task_type}' (estimators exist for: "
            f"{', '.join(sorted(ESTIMATORS))}); add one to gppf.transfer.transferability.ESTIMATORS or choose "
            "the route with finetune.route copy:<task>, learn or an explicit [L][k] list")
    est = ESTIMATORS[task_type]
    if score is None:
        return est
    if score not in SCORES:
        raise TransferabilityError(f"unknown transferability score '{score}' (known: {', '.join(SCORES)})")
    if score == "gbc" and task_type == "multilabel":
        raise TransferabilityError("gbc scores single-label pairs; multilabel uses logme")
    return Estimator(est.method.replace("logme", score), est.pairs, SCORES[score])
