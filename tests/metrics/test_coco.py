"""COCO metrics: agreement with a direct pycocotools run on hand-made data, sanity cases, fallbacks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

from gppf.data.collate import Batch
from gppf.metrics.coco import (
    COCO_KEYPOINT_SIGMAS,
    CocoDetectionMetric,
    CocoKeypointMetric,
    default_sigmas,
    make_coco,
)

# ----------------------------------------------------------------------------- detection data

IMAGES = {1: (100, 120), 2: (80, 80), 5: (60, 90)}  # id -> (H, W)
CAT_IDS = [3, 7]  # contiguous label -> COCO category id
GT_BOXES = {  # image id -> [(label, [x, y, w, h])]
    1: [(0, [10, 10, 40, 30]), (1, [60, 50, 50, 40])],
    2: [(0, [5, 5, 20, 20]), (0, [30, 30, 45, 45])],
    5: [(1, [0, 0, 80, 50])],
}
# (image id, label, [x, y, w, h], score): hits, a loose box, a false positive, a wrong class, a miss
DETECTIONS = [
    (1, 0, [11, 10, 40, 31], 0.9),
    (1, 1, [62, 55, 45, 40], 0.6),
    (1, 0, [70, 0, 20, 20], 0.7),
    (2, 0, [5, 5, 20, 20], 0.95),
    (2, 1, [30, 30, 45, 45], 0.8),
    (5, 1, [4, 0, 80, 44], 0.5),
]


def detection_gt() -> dict:
    anns = [
        {"id": i + 1, "image_id": img, "category_id": CAT_IDS[lab], "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for i, (img, lab, box) in enumerate((img, lab, box) for img, objs in GT_BOXES.items() for lab, box in objs)
    ]
    return {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in IMAGES.items()],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS],
    }


def direct_cocoeval(gt_dict: dict, results: list[dict], iou_type: str, img_ids: list[int], sigmas=None) -> np.ndarray:
    gt = make_coco(copy.deepcopy(gt_dict))
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iouType=iou_type)
    ev.params.imgIds = img_ids
    if sigmas is not None:
        ev.params.kpt_oks_sigmas = np.asarray(sigmas)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def _xyxy(box: list[float], scale: float = 1.0) -> list[float]:
    return [box[0] / scale, box[1] / scale, (box[0] + box[2]) / scale, (box[1] + box[3]) / scale]


def detection_batch(image_ids: list[int], *, input_size: int = 40) -> Batch:
    """Targets in network-input pixels (plain resize of each image to input_size x input_size)."""
    targets = []
    for img in image_ids:
        h, w = IMAGES[img]
        sx, sy = w / input_size, h / input_size
        boxes = [[b[0] / sx, b[1] / sy, (b[0] + b[2]) / sx, (b[1] + b[3]) / sy] for _, b in GT_BOXES[img]]
        targets.append({
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(input_size, input_size)),
            "labels": torch.tensor([lab for lab, _ in GT_BOXES[img]]),
            "image_id": img,
            "orig_size": (h, w),
        })
    return Batch(images=torch.zeros(len(image_ids), 3, input_size, input_size), targets=targets)


def detection_preds(image_ids: list[int], detections=DETECTIONS) -> list[dict]:
    out = []
    for img in image_ids:
        dets = [d for d in detections if d[0] == img]
        out.append({
            "boxes": torch.tensor([_xyxy(d[2]) for d in dets]).reshape(-1, 4),
            "scores": torch.tensor([d[3] for d in dets]),
            "labels": torch.tensor([d[1] for d in dets], dtype=torch.int64),
            "image_id": img,
        })
    return out


def detection_results() -> list[dict]:
    return [{"image_id": i, "category_id": CAT_IDS[lab], "bbox": box, "score": s} for i, lab, box, s in DETECTIONS]


def test_detection_map_equals_direct_pycocotools(capsys: pytest.CaptureFixture) -> None:
    metric = CocoDetectionMetric(num_classes=2, coco=make_coco(detection_gt()), cat_ids=CAT_IDS)
    metric.update(detection_preds([1, 2]), detection_batch([1, 2]))
    metric.update(detection_preds([5]), detection_batch([5]))
    got = metric.compute()
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured ...
    assert "Average Precision" in metric.log  # ... and kept
    stats = direct_cocoeval(detection_gt(), detection_results(), "bbox", [1, 2, 5])
    assert got == pytest.approx({"map": stats[0], "map50": stats[1]}, abs=1e-12)
    assert 0.2 < got["map"] < got["map50"] < 1.0  # the case is neither trivial nor perfect


def test_detection_restricted_to_seen_images_and_default_cat_ids() -> None:
    metric = CocoDetectionMetric(num_classes=2, coco=make_coco(detection_gt()))  # cat ids: sorted coco ids
    metric.update(detection_preds([1]), detection_batch([1]))
    got = metric.compute()
    results = [r for r in detection_results() if r["image_id"] == 1]
    stats = direct_cocoeval(detection_gt(), results, "bbox", [1])
    assert got == pytest.approx({"map": stats[0], "map50": stats[1]}, abs=1e-12)


def test_detection_ground_truth_rebuilt_from_batches_matches_coco() -> None:
    with_coco = CocoDetectionMetric(num_classes=2, coco=make_coco(detection_gt()), cat_ids=CAT_IDS)
    rebuilt = CocoDetectionMetric(num_classes=2)
    for metric in (with_coco, rebuilt):
        metric.update(detection_preds([1, 2, 5]), detection_batch([1, 2, 5]))
    assert rebuilt.compute() == pytest.approx(with_coco.compute(), abs=1e-9)


def test_detection_perfect_and_empty_predictions() -> None:
    perfect = [(img, lab, box, 1.0) for img, objs in GT_BOXES.items() for lab, box in objs]
    metric = CocoDetectionMetric(num_classes=2, coco=make_coco(detection_gt()), cat_ids=CAT_IDS)
    metric.update(detection_preds([1, 2, 5], perfect), detection_batch([1, 2, 5]))
    assert metric.compute() == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    metric.reset()
    metric.update(detection_preds([1, 2, 5], []), detection_batch([1, 2, 5]))
    assert metric.compute() == {"map": 0.0, "map50": 0.0}
    metric.reset()
    assert metric.compute() == {"map": 0.0, "map50": 0.0}


def test_detection_unknown_image_id_is_an_error() -> None:
    metric = CocoDetectionMetric(num_classes=2, coco=make_coco(detection_gt()), cat_ids=CAT_IDS)
    batch = detection_batch([1])
    batch.targets[0]["image_id"] = 42
    metric.update(detection_preds([1]), batch)
    with pytest.raises(ValueError, match=r"\[42\]"):
        metric.compute()


# ----------------------------------------------------------------------------- keypoints data

SIGMAS = (0.05, 0.08, 0.1)
# ann id -> (image id, person box xyxy, keypoints [K, 3] original pixels, area)
PERSONS = {
    11: (1, [10.0, 20.0, 60.0, 120.0], [[30, 30, 2], [20, 80, 2], [50, 110, 1]], 4000.0),
    12: (1, [70.0, 10.0, 110.0, 90.0], [[90, 20, 2], [80, 60, 1], [0, 0, 0]], 2500.0),
    13: (2, [5.0, 5.0, 45.0, 65.0], [[25, 10, 2], [15, 40, 2], [35, 60, 2]], 2000.0),
}
OFFSETS = {11: [[1, -1], [3, 2], [-6, 4]], 12: [[2, 2], [-9, 6], [5, 5]], 13: [[15, 0], [0, 1], [2, -2]]}
SCORES = {11: 0.9, 12: 0.4, 13: 0.7}


def keypoint_gt() -> dict:
    anns = []
    for ann_id, (img, box, kpts, area) in PERSONS.items():
        flat = [float(v) for kp in kpts for v in kp]
        anns.append({
            "id": ann_id, "image_id": img, "category_id": 1, "keypoints": flat,
            "num_keypoints": sum(kp[2] > 0 for kp in kpts), "area": area,
            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0,
        })
    return {
        "images": [{"id": 1, "height": 150, "width": 150}, {"id": 2, "height": 100, "width": 100}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": ["a", "b", "c"]}],
    }


def keypoint_batch(ann_ids: list[int], *, input_size: int = 32) -> Batch:
    """Top-down samples: crop = person box enlarged by 10 px, resized to input_size x input_size."""
    targets = []
    for ann_id in ann_ids:
        img, box, kpts, area = PERSONS[ann_id]
        crop = [box[0] - 10, box[1] - 10, box[2] + 10, box[3] + 10]
        sx, sy = (crop[2] - crop[0]) / input_size, (crop[3] - crop[1]) / input_size
        k = torch.tensor(kpts, dtype=torch.float32)
        k_in = torch.stack([(k[:, 0] - crop[0]) / sx, (k[:, 1] - crop[1]) / sy, k[:, 2]], 1)
        targets.append({
            "keypoints": k_in, "box": torch.tensor(box), "crop_box": torch.tensor(crop), "area": area,
            "ann_id": ann_id, "image_id": img, "orig_size": (int(crop[3] - crop[1]), int(crop[2] - crop[0])),
        })
    return Batch(images=torch.zeros(len(ann_ids), 3, input_size, input_size), targets=targets)


def keypoint_preds(ann_ids: list[int], offsets=OFFSETS) -> dict:
    kpts = []
    for ann_id in ann_ids:
        k = torch.tensor(PERSONS[ann_id][2], dtype=torch.float32)
        xy = k[:, :2] + torch.tensor(offsets[ann_id], dtype=torch.float32)
        kpts.append(torch.cat([xy, torch.full((3, 1), SCORES[ann_id])], 1))
    return {"keypoints": torch.stack(kpts), "scores": torch.tensor([SCORES[a] for a in ann_ids])}


def keypoint_results(ann_ids: list[int]) -> list[dict]:
    preds = keypoint_preds(ann_ids)
    return [
        {"image_id": PERSONS[a][0], "category_id": 1, "keypoints": preds["keypoints"][i].reshape(-1).tolist(),
         "score": SCORES[a]}
        for i, a in enumerate(ann_ids)
    ]


def test_keypoint_ap_equals_direct_pycocotools() -> None:
    metric = CocoKeypointMetric(num_keypoints=3, coco=make_coco(keypoint_gt()), sigmas=SIGMAS)
    metric.update(keypoint_preds([11, 12]), keypoint_batch([11, 12]))
    metric.update(keypoint_preds([13]), keypoint_batch([13]))
    got = metric.compute()
    stats = direct_cocoeval(keypoint_gt(), keypoint_results([11, 12, 13]), "keypoints", [1, 2], sigmas=SIGMAS)
    assert got["ap"] == pytest.approx(stats[0], abs=1e-12)
    assert 0.0 < got["ap"] < 1.0
    assert "Average Precision" in metric.log


def test_pck_counts_labelled_keypoints_within_a_fifth_of_the_box() -> None:
    """Thresholds 0.2 * max side: person 11 -> 20 px, 12 -> 16 px, 13 -> 12 px. Misses: 13's first
    keypoint (15 px off). 12's third keypoint is unlabelled. So 7 of 8 labelled keypoints are hits."""
    metric = CocoKeypointMetric(num_keypoints=3, sigmas=SIGMAS)
    metric.update(keypoint_preds([11, 12, 13]), keypoint_batch([11, 12, 13]))
    assert metric.compute()["pck"] == pytest.approx(7 / 8)


def test_keypoint_ground_truth_rebuilt_from_batches_matches_coco() -> None:
    with_coco = CocoKeypointMetric(num_keypoints=3, coco=make_coco(keypoint_gt()), sigmas=SIGMAS)
    rebuilt = CocoKeypointMetric(num_keypoints=3, sigmas=SIGMAS)
    for metric in (with_coco, rebuilt):
        metric.update(keypoint_preds([11, 12, 13]), keypoint_batch([11, 12, 13]))
    assert rebuilt.coco is None
    assert rebuilt.compute() == pytest.approx(with_coco.compute(), abs=1e-6)


def test_keypoint_perfect_empty_and_seen_instances_only() -> None:
    zero = {a: [[0, 0]] * 3 for a in PERSONS}
    metric = CocoKeypointMetric(num_keypoints=3, coco=make_coco(keypoint_gt()), sigmas=SIGMAS)
    metric.update(keypoint_preds([11, 12, 13], zero), keypoint_batch([11, 12, 13]))
    assert metric.compute() == {"ap": pytest.approx(1.0), "pck": pytest.approx(1.0)}
    metric.reset()
    assert metric.compute() == {"ap": 0.0, "pck": 0.0}
    # only person 11 of image 1 seen: person 12 is not counted as a miss
    metric.update(keypoint_preds([11], zero), keypoint_batch([11]))
    assert metric.compute()["ap"] == pytest.approx(1.0)


def test_default_sigmas_and_validation() -> None:
    assert default_sigmas(17) == COCO_KEYPOINT_SIGMAS
    assert np.allclose(COCO_KEYPOINT_SIGMAS, COCOeval(iouType="keypoints").params.kpt_oks_sigmas)
    assert default_sigmas(4) == (0.07,) * 4
    with pytest.raises(ValueError, match="sigmas"):
        CocoKeypointMetric(num_keypoints=3, sigmas=(0.1, 0.1))
    no_kpts = make_coco(detection_gt())  # a COCO set without keypoints falls back to the batches
    assert CocoKeypointMetric(num_keypoints=3, coco=no_kpts).coco is None
