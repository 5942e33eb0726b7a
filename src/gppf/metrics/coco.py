"""COCO metrics through pycocotools: box mAP (detection) and OKS AP + PCK (top-down keypoints).

Both metrics follow the task ``Metric`` protocol (``update(preds, batch)``, ``compute()``, ``reset()``).
Predictions arrive in ORIGINAL image pixels (see ``gppf.heads.detection`` / ``gppf.heads.keypoints``).
Ground truth is ``coco`` (a pycocotools ``COCO`` in original coordinates) when given; otherwise it is
rebuilt from the batch targets mapped back to original pixels, so any reader can be evaluated.
pycocotools' printed summary is captured in ``metric.log`` instead of going to stdout.
"""
from __future__ import annotations

import io
from contextlib import redirect_stdout
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from gppf.heads.detection import boxes_to_original, target_boxes
from gppf.heads.keypoints import keypoints_to_original, target_keypoints

#: pycocotools' per-keypoint OKS sigmas of the 17 COCO person keypoints.
COCO_KEYPOINT_SIGMAS: tuple[float, ...] = tuple(
    s / 10.0
    for s in (0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89)
)
#: OKS sigma used for every keypoint of non-COCO layouts (about the mean COCO sigma).
DEFAULT_KEYPOINT_SIGMA = 0.07


def default_sigmas(num_keypoints: int) -> tuple[float, ...]:
    """COCO's sigmas for 17 keypoints, else ``DEFAULT_KEYPOINT_SIGMA`` for each keypoint."""
    if num_keypoints == len(COCO_KEYPOINT_SIGMAS):
        return COCO_KEYPOINT_SIGMAS
    return (DEFAULT_KEYPOINT_SIGMA,) * num_keypoints


def make_coco(dataset: Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` indexed from an in-memory ``{"images", "annotations", "categories"}`` dict."""
    coco = COCO()
    coco.dataset = dict(dataset)
    with redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
    *, gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int],
    sigmas: Sequence[float] | None = None,
) -> tuple[np.ndarray, str]:
    """Run ``COCOeval`` on ``results`` restricted to ``image_ids``; returns (``stats`` [12 or 10], log).

    ``results`` must be non-empty (pycocotools cannot load an empty result list).
    """
    log = io.StringIO()
    with redirect_stdout(log):
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64), log.getvalue()


def _nonneg(value: float) -> float:
    """pycocotools reports -1 when there is no ground truth: count that as 0."""
    return max(float(value), 0.0)


def _check_known(gt: COCO, image_ids: set[int]) -> None:
    unknown = sorted(image_ids - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"image ids {unknown[:10]} of the predictions are not in the ground-truth COCO set")


def _input_size(batch: Any) -> tuple[int, int]:
    return int(batch.images.shape[-2]), int(batch.images.shape[-1])


class CocoDetectionMetric:
    """Box mAP@[.5:.95] (``map``) and mAP@.5 (``map50``) over the images seen by ``update``.

    ``preds``: per image ``{"boxes" [n,4] XYXY original pixels, "scores" [n], "labels" [n]}``. Labels map
    to COCO category ids through ``cat_ids[label]``; default: the sorted category ids of ``coco``, or
    ``label + 1`` when ground truth comes from the batches.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        coco: COCO | None = None,
        cat_ids: Sequence[int] | Mapping[int, int] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.coco = coco
        if cat_ids is None:
            cat_ids = sorted(coco.getCatIds()) if coco is not None else list(range(1, num_classes + 1))
        self.cat_ids = cat_ids
        self.log = ""
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()
        self._gt_images: dict[int, dict[str, Any]] = {}
        self._gt_anns: list[dict[str, Any]] = []

    def _cat(self, label: int) -> int:
        return int(self.cat_ids[label])

    def update(self, preds: Sequence[Mapping[str, Any]], batch: Any) -> None:
        """Add one batch of predictions (and, without ``coco``, its ground truth)."""
        for pred, target in zip(preds, batch.targets):
            image_id = int(target["image_id"])
            self.image_ids.add(image_id)
            xywh = box_convert(pred["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
            scores = pred["scores"].detach().float().cpu().tolist()
            labels = pred["labels"].detach().cpu().tolist()
            self.results += [
                {"image_id": image_id, "category_id": self._cat(lab), "bbox": box, "score": score}
                for box, score, lab in zip(xywh, scores, labels)
            ]
            if self.coco is None:
                self._add_gt(target, image_id=image_id, input_size=_input_size(batch))

    def _add_gt(self, target: Mapping[str, Any], *, image_id: int, input_size: tuple[int, int]) -> None:
        boxes = boxes_to_original(target_boxes(target).cpu(), target=target, input_size=input_size)
        labels = torch.as_tensor(target["labels"]).reshape(-1).tolist()
        h, w = (int(s) for s in target["orig_size"])
        self._gt_images[image_id] = {"id": image_id, "height": h, "width": w}
        for box, lab in zip(box_convert(boxes, "xyxy", "xywh").tolist(), labels):
            self._gt_anns.append({
                "id": len(self._gt_anns) + 1, "image_id": image_id, "category_id": self._cat(lab),
                "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
            })

    def ground_truth(self) -> COCO:
        """The ground truth used by ``compute`` (``coco``, or the one rebuilt from the batches)."""
        if self.coco is not None:
            return self.coco
        categories = [{"id": self._cat(i), "name": str(i)} for i in range(self.num_classes)]
        images = list(self._gt_images.values())
        return make_coco({"images": images, "annotations": self._gt_anns, "categories": categories})

    def compute(self) -> dict[str, float]:
        """``{"map", "map50"}``; 0 when nothing was detected or there is no ground truth."""
        if not self.image_ids or not self.results:
            self.log = "no detections" if self.image_ids else "no images"
            return {"map": 0.0, "map50": 0.0}
        gt = self.ground_truth()
        _check_known(gt, self.image_ids)
        stats, self.log = coco_evaluate(gt=gt, results=self.results, iou_type="bbox", image_ids=sorted(self.image_ids))
        return {"map": _nonneg(stats[0]), "map50": _nonneg(stats[1])}


def has_keypoint_annotations(coco: COCO | None) -> bool:
    """Whether ``coco`` holds at least one annotation with labelled keypoints."""
    if coco is None:
        return False
    return any(ann.get("num_keypoints", 0) > 0 and "keypoints" in ann for ann in coco.anns.values())


def _person_box(target: Mapping[str, Any]) -> torch.Tensor:
    """The instance box (original XYXY): ``box``, else the ``crop_box``."""
    box = target["box"] if "box" in target else target["crop_box"]
    return torch.as_tensor(box).detach().float().reshape(4).cpu()


class CocoKeypointMetric:
    """Top-down keypoint metric: COCO OKS AP (``ap``) and PCK@``pck_threshold`` (``pck``).

    ``preds``: ``{"keypoints" [B, K, 3] (x, y, confidence) in original pixels, "scores" [B]}``. OKS AP uses
    ``coco`` when it holds keypoint annotations (restricted to the seen images and, when every sample
    carries ``ann_id``, to the seen instances; crowd / keypoint-less annotations stay as ignore regions);
    otherwise a ground truth rebuilt from the batches (OKS scale = ``target["area"]``, else the box area).
    PCK: a labelled keypoint is correct within ``pck_threshold * max(box width, box height)``.
    """

    def __init__(
        self,
        *,
        num_keypoints: int,
        coco: COCO | None = None,
        sigmas: Sequence[float] | None = None,
        category_id: int | None = None,
        pck_threshold: float = 0.2,
    ) -> None:
        sigmas = tuple(sigmas) if sigmas is not None else default_sigmas(num_keypoints)
        if len(sigmas) != num_keypoints:
            raise ValueError(f"got {len(sigmas)} OKS sigmas for {num_keypoints} keypoints")
        self.num_keypoints, self.sigmas, self.pck_threshold = num_keypoints, sigmas, pck_threshold
        self.coco = coco if has_keypoint_annotations(coco) else None
        if category_id is None:
            category_id = min(self.coco.getCatIds()) if self.coco is not None else 1
        self.category_id = category_id
        self.log = ""
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()
        self.ann_ids: list[int] = []
        self._gt_images: dict[int, dict[str, Any]] = {}
        self._gt_anns: list[dict[str, Any]] = []
        self.pck_hits = 0
        self.pck_total = 0

    def update(self, preds: Mapping[str, Any], batch: Any) -> None:
        """Add one batch: COCO results, PCK counts and (without ``coco``) ground-truth instances."""
        input_size = _input_size(batch)
        pred_kpts = preds["keypoints"].detach().float().cpu()
        scores = preds["scores"].detach().float().cpu().tolist()
        gt = target_keypoints(batch.targets).cpu()
        gt_xy = keypoints_to_original(gt[..., :2], targets=batch.targets, input_size=input_size)
        gt = torch.cat([gt_xy, gt[..., 2:]], -1)
        self._update_pck(pred_kpts, gt, batch.targets)
        for i, target in enumerate(batch.targets):
            image_id = int(target["image_id"])
            ann_id = int(target.get("ann_id", -1))
            self.image_ids.add(image_id)
            self.ann_ids.append(ann_id)
            category = self.category_id
            if self.coco is not None and ann_id in self.coco.anns:
                category = int(self.coco.anns[ann_id]["category_id"])
            self.results.append({
                "image_id": image_id, "category_id": category,
                "keypoints": pred_kpts[i].reshape(-1).tolist(), "score": scores[i],
            })
            if self.coco is None:
                self._add_gt(target, keypoints=gt[i], image_id=image_id)

    def _update_pck(self, pred: torch.Tensor, gt: torch.Tensor, targets: Sequence[Mapping[str, Any]]) -> None:
        boxes = torch.stack([_person_box(t) for t in targets])
        size = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
        dist = (pred[..., :2] - gt[..., :2]).norm(dim=-1)
        labelled = gt[..., 2] > 0
        hits = (dist <= self.pck_threshold * size[:, None]) & labelled
        self.pck_hits += int(hits.sum())
        self.pck_total += int(labelled.sum())

    def _add_gt(self, target: Mapping[str, Any], *, keypoints: torch.Tensor, image_id: int) -> None:
        x0, y0, x1, y1 = _person_box(target).tolist()
        area = float(target.get("area", 0.0)) or (x1 - x0) * (y1 - y0)
        size = target.get("image_size", target["orig_size"])
        self._gt_images[image_id] = {"id": image_id, "height": int(size[0]), "width": int(size[1])}
        labelled = keypoints[:, 2] > 0
        flat = torch.cat([keypoints[:, :2] * labelled[:, None], keypoints[:, 2:]], -1).reshape(-1).tolist()
        self._gt_anns.append({
            "id": len(self._gt_anns) + 1, "image_id": image_id, "category_id": self.category_id,
            "keypoints": flat, "num_keypoints": int(labelled.sum()), "area": area,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
        })

    def ground_truth(self) -> COCO:
        """The ground truth used for OKS AP (see the class docstring)."""
        if self.coco is None:
            categories = [{"id": self.category_id, "name": "object"}]
            return make_coco({"images": list(self._gt_images.values()), "annotations": self._gt_anns,
                              "categories": categories})
        if not self.ann_ids or min(self.ann_ids) < 0:
            return self.coco
        seen = set(self.ann_ids)
        anns = [
            a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=sorted(self.image_ids)))
            if a["id"] in seen or a.get("iscrowd", 0) or a.get("num_keypoints", 0) == 0
        ]
        return make_coco({**self.coco.dataset, "annotations": anns})

    def compute(self) -> dict[str, float]:
        """``{"ap", "pck"}`` (both 0 before any update)."""
        pck = self.pck_hits / self.pck_total if self.pck_total else 0.0
        if not self.results:
            self.log = "no predictions"
            return {"ap": 0.0, "pck": pck}
        gt = self.ground_truth()
        _check_known(gt, self.image_ids)
        stats, self.log = coco_evaluate(
            gt=gt, results=self.results, iou_type="keypoints", image_ids=sorted(self.image_ids), sigmas=self.sigmas
        )
        return {"ap": _nonneg(stats[0]), "pck": pck}
