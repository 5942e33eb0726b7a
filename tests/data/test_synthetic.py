"""The ``synthetic`` reader: determinism, exact targets for every task type, options."""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

from gppf.config import DataConfig
from gppf.data.base import READERS, DataError
from gppf.data.synthetic import DOMAINS, SHAPES, SyntheticDataset, build, mask_box

ALL_TASKS = ("classification", "multilabel", "detection", "segmentation", "keypoints", "reid")
ALL_DOMAINS = (*DOMAINS, "mixed")


def make(task: str, split: str = "val", **options: Any) -> SyntheticDataset:
    options.setdefault("num_train", 60)
    options.setdefault("num_val", 40)
    if task == "reid":
        options.setdefault("num_identities", 50)
    ds = build(DataConfig(options=options), split=split, task_type=task, on_bad_sample="error")
    assert isinstance(ds, SyntheticDataset)
    return ds


def image_bytes(ds: SyntheticDataset, index: int) -> bytes:
    return ds[index][0].numpy().tobytes()


def flat_background(image: np.ndarray) -> np.ndarray:
    """Pixels that differ from the flat domain's uniform background (the corners agree on it)."""
    corners = [tuple(image[y, x]) for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1))]
    bg = max(set(corners), key=corners.count)
    return (image != np.array(bg, dtype=np.uint8)).any(axis=-1)


def assert_tight(mask: np.ndarray, box: list[float]) -> None:
    x0, y0, x1, y1 = (int(v) for v in box)
    assert mask.any() and not mask.sum() - mask[y0:y1, x0:x1].sum()
    assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
    assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()


def test_registered_under_synthetic() -> None:
    assert READERS.get("synthetic") is build


@pytest.mark.parametrize("task", ALL_TASKS)
def test_items_are_deterministic_and_split_specific(task: str) -> None:
    a, b = make(task, "val", seed=3), make(task, "val", seed=3)
    train, other_seed = make(task, "train", seed=3), make(task, "val", seed=4)
    for i in range(5):
        img, target = a[i]
        assert isinstance(img, tv_tensors.Image) and img.dtype == torch.uint8 and img.shape == (3, 64, 64)
        assert target["image_id"] == i and target["orig_size"] == (64, 64)
        assert image_bytes(a, i) == image_bytes(b, i)
        assert image_bytes(a, i) != image_bytes(train, i)
        assert image_bytes(a, i) != image_bytes(other_seed, i)


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_every_domain_renders_every_size(domain: str) -> None:
    for size in (32, 96):
        img, target = make("classification", domain=domain, size=size)[0]
        assert img.shape == (3, size, size) and target["orig_size"] == (size, size)
        assert img.numpy().std() > 5  # not a blank canvas


def test_domains_change_appearance_not_labels() -> None:
    sets = {d: make("detection", domain=d) for d in DOMAINS}
    flat_img, flat_t = sets["flat"][7]
    for d, ds in sets.items():
        img, t = ds[7]
        assert torch.equal(t["labels"], flat_t["labels"]) and torch.equal(t["boxes"], flat_t["boxes"])
        if d != "flat":
            assert not torch.equal(img, flat_img)
    means = {d: float(np.mean([ds[i][0].float().mean() for i in range(10)])) for d, ds in sets.items()}
    assert means["night"] < 70 < means["pastel"]


def test_classification_label_is_the_single_drawn_shape() -> None:
    ds = make("classification", domain="flat", num_classes=7)
    assert ds.classes == list(SHAPES[:7])
    labels = set()
    for i in range(len(ds)):
        img, target = ds[i]
        scene = ds.scene(i)
        assert target["label"] == scene.labels[0] and 0 <= target["label"] < 7
        drawn = flat_background(img.permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(drawn, scene.masks[0])  # exactly the object's pixels
        assert len(np.unique(img.permute(1, 2, 0).numpy()[drawn], axis=0)) == 1  # one flat colour
        labels.add(target["label"])
    assert len(labels) >= 5


def test_multilabel_marks_exactly_the_visible_shapes() -> None:
    ds = make("multilabel", domain="textured", max_objects=3)
    counts = []
    for i in range(len(ds)):
        _, target = ds[i]
        scene = ds.scene(i)
        expected = torch.zeros(10)
        expected[scene.labels] = 1
        assert torch.equal(target["labels"], expected) and target["labels"].dtype == torch.float32
        assert len(set(scene.labels)) == len(scene.labels) <= 3
        assert all(m.sum() > 20 for m in scene.masks)
        counts.append(len(scene.labels))
    assert min(counts) == 1 and max(counts) == 3


def test_detection_boxes_are_tight_around_drawn_pixels() -> None:
    ds = make("detection", domain="flat", max_objects=5, num_classes=4)
    multi = 0
    for i in range(len(ds)):
        img, target = ds[i]
        scene = ds.scene(i)
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format.value == "XYXY"
        assert tuple(boxes.canvas_size) == (64, 64)
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == scene.labels
        assert all(0 <= label < 4 for label in scene.labels) and 1 <= len(scene.labels) <= 5
        for mask, box in zip(scene.masks, boxes.tolist()):
            assert_tight(mask, box)
        union = np.logical_or.reduce(scene.masks)
        np.testing.assert_array_equal(flat_background(img.permute(1, 2, 0).numpy()), union)
        multi += len(scene.labels) > 1
    assert multi > len(ds) // 2


def test_segmentation_mask_matches_drawn_objects() -> None:
    ds = make("segmentation", domain="flat", num_classes=5)
    assert ds.classes[0] == "background" and ds.classes[1:] == list(SHAPES[:5])
    for i in range(len(ds)):
        img, target = ds[i]
        scene = ds.scene(i)
        mask = target["mask"]
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (64, 64)
        m = mask.numpy()
        assert set(np.unique(m).tolist()) <= {0, *(label + 1 for label in scene.labels)}
        for label in set(scene.labels):
            expected = np.logical_or.reduce([v for v, lab in zip(scene.masks, scene.labels) if lab == label])
            np.testing.assert_array_equal(m == label + 1, expected)
        np.testing.assert_array_equal(flat_background(img.permute(1, 2, 0).numpy()), m > 0)


def test_keypoints_lie_on_the_creature_and_respect_visibility() -> None:
    ds = make("keypoints", domain="noisy", num_val=80)
    assert ds.keypoint_names[0] == "head" and len(ds.sigmas) == len(ds.keypoint_names) == 9
    assert all(0.05 <= s <= 0.1 for s in ds.sigmas)
    seen = set()
    for i in range(len(ds)):
        _, target = ds[i]
        scene = ds.scene(i)
        kps = target["keypoints"]
        assert kps.shape == (9, 3) and kps.dtype == torch.float32
        assert target["crop_box"].tolist() == [0, 0, 64, 64] and target["area"] > 50
        x0, y0, x1, y1 = target["box"].tolist()
        for x, y, v in kps.tolist():
            seen.add(v)
            if v == 0:
                assert x == y == 0
                continue
            assert 0 <= x < 64 and 0 <= y < 64 and x0 <= x <= x1 and y0 <= y <= y1
            on_body = scene.masks[0][int(y), int(x)]
            assert on_body if v == 2 else (not on_body and scene.extra_masks[0][int(y), int(x)])
        left, right = kps[[2, 5, 7]], kps[[3, 6, 8]]  # facing the viewer: left limbs on image right
        both = (left[:, 2] > 0) & (right[:, 2] > 0)
        assert (left[both, 0] > right[both, 0]).all()
    assert seen == {0.0, 1.0, 2.0}


def quiet_eval(ds: SyntheticDataset, results: list[dict[str, Any]], iou_type: str) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(ds.coco, ds.coco.loadRes(results), iou_type)
        if iou_type == "keypoints":
            ev.params.kpt_oks_sigmas = ds.sigmas
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_detection_coco_scores_ground_truth_perfectly() -> None:
    ds = make("detection", num_val=30)
    assert ds.cat_ids == [1, 2, 3, 4, 5, 6]
    results = []
    for i in range(len(ds)):
        _, t = ds[i]
        for (x0, y0, x1, y1), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            results.append({"image_id": t["image_id"], "category_id": ds.cat_ids[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 1.0})
    assert len(ds.coco.getAnnIds()) == len(results)
    assert quiet_eval(ds, results, "bbox") == pytest.approx(1.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] * 0.6, *r["bbox"][1:]]} for r in results]
    assert quiet_eval(ds, shifted, "bbox") < 0.2


def test_keypoint_coco_scores_ground_truth_perfectly() -> None:
    ds = make("keypoints", num_val=30)
    cat = ds.coco.loadCats(1)[0]
    assert cat["name"] == "creature" and cat["keypoints"] == ds.keypoint_names
    results = []
    for i in range(len(ds)):
        _, t = ds[i]
        results.append({"image_id": t["image_id"], "category_id": 1, "score": 1.0,
                        "keypoints": t["keypoints"].reshape(-1).tolist()})
        ann = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[i]))[0]
        assert ann["num_keypoints"] == int((t["keypoints"][:, 2] > 0).sum()) and ann["iscrowd"] == 0
    assert quiet_eval(ds, results, "keypoints") == pytest.approx(1.0)


def test_coco_only_for_detection_and_keypoints() -> None:
    assert not hasattr(make("classification"), "coco")


def test_reid_identities_are_disjoint_and_repeated_in_val() -> None:
    train = make("reid", "train", num_identities=50, num_train=100, num_val=40)
    val = make("reid", "val", num_identities=50, num_train=100, num_val=40)
    assert len(train.classes) == 40 and len(val.classes) == 10 and val.identity_offset == 40
    assert len(set(train.classes) | set(val.classes)) == 50
    train_ids = {train[i][1]["identity"] for i in range(len(train))}
    val_ids = [val[i][1]["identity"] for i in range(len(val))]
    assert train_ids == set(range(40)) and set(val_ids) == set(range(40, 50))
    assert min(val_ids.count(k) for k in set(val_ids)) >= 2
    same = [i for i, k in enumerate(val_ids) if k == val_ids[0]]
    assert image_bytes(val, same[0]) != image_bytes(val, same[1])  # new pose and background
    assert val.scene(same[0]).labels == [val_ids[0]]


@pytest.mark.parametrize(
    ("task", "options", "match"),
    [
        ("classification", {"domian": "flat"}, r"data\.options\.domian: unknown option.*did you mean 'domain'"),
        ("classification", {"max_objects": 3}, r"data\.options\.max_objects: does not apply"),
        ("keypoints", {"num_classes": 3}, r"data\.options\.num_classes: does not apply"),
        ("classification", {"domain": "nigth"}, r"unknown domain 'nigth'; did you mean 'night'"),
        ("classification", {"num_classes": 11}, r"data\.options\.num_classes: expected an integer in \[1, 10\]"),
        ("detection", {"size": "64"}, r"data\.options\.size"),
        ("reid", {"num_identities": 100, "num_val": 30}, r"data\.options\.num_val: reid val needs"),
        ("panoptic", {}, r"does not support task type 'panoptic'"),
    ],
)
def test_bad_options_raise_data_error(task: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        build(DataConfig(options=options), split="train", task_type=task, on_bad_sample="error")


def test_bad_split_and_classes_raise_data_error() -> None:
    with pytest.raises(DataError, match="split"):
        build(DataConfig(), split="test", task_type="classification", on_bad_sample="error")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="data.classes"):
        build(DataConfig(classes=["a", "b"]), split="train", task_type="classification", on_bad_sample="error")
    ds = build(DataConfig(classes=list(SHAPES[:3]), options={"num_classes": 3}), split="train",
               task_type="classification", on_bad_sample="skip")
    assert ds.classes == list(SHAPES[:3]) and ds.bad.total == 0


def test_index_out_of_range() -> None:
    ds = make("classification")
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None
