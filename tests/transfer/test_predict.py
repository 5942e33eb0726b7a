"""`gppf predict`: results on image files equal the routed model + head on the task's validation
preprocessing, mapped to ORIGINAL pixels; corrupt files are named and skipped; user mistakes are clear.

The reference values are computed here independently of ``gppf.transfer.predict``: the image is read
with PIL, sent through the task type's own ``val_transform`` of the run's config, the run's model and the
head's ``predict`` (or the expected original-pixel mapping written out by hand).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import tv_tensors

from gppf.cli import main
from gppf.config import DataConfig
from gppf.data.collate import Batch
from gppf.data.synthetic.dataset import build as build_synthetic
from gppf.registry import TASK_TYPES
from gppf.transfer.pretrained import load_pretrained

# (relative path, height, width); "b.jpg" is JPEG, the others PNG; original sizes differ from 32 px
GOOD = [("a.png", 48, 48), ("b.jpg", 40, 48), ("sub/c.png", 48, 40)]
BAD = ["bad.jpg", "empty.png", "trunc.jpg"]


@pytest.fixture(scope="module")
def sharp_run(pretrained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the 4-step run whose segmentation / detection output layers are scaled up, so that
    class ids and boxes vary across pixels and images (a barely trained head predicts one class)."""
    run = tmp_path_factory.mktemp("sharp") / "run"
    shutil.copytree(pretrained_run, run, symlinks=True, ignore=shutil.ignore_patterns("tb", "report"))
    path = next(run.glob("checkpoints/step_*/model.safetensors"))
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(0)
    for key, scale in (("model.heads.segmentation.classifier", 40.0), ("model.heads.detection.cls_logits", 60.0)):
        tensors[f"{key}.weight"] = torch.randn(tensors[f"{key}.weight"].shape, generator=gen) * scale / 100
        tensors[f"{key}.bias"] = torch.zeros_like(tensors[f"{key}.bias"]) - (1.0 if "detection" in key else 0.0)
    save_file(tensors, str(path))
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic scenes saved as PNG / JPEG at 48 x 48, 40 x 48 and 48 x 40, plus unreadable files."""
    root = tmp_path_factory.mktemp("images")
    data = DataConfig(format="synthetic", options={"domain": "pastel", "size": 48, "num_train": 4, "num_val": 4})
    scenes = build_synthetic(data, split="val", task_type="detection", on_bad_sample="error")
    for i, (name, h, w) in enumerate(GOOD):
        arr = scenes[i][0].permute(1, 2, 0).numpy()[:h, :w]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(arr)).save(root / name)
    (root / "bad.jpg").write_bytes(b"this is not an image")
    (root / "empty.png").write_bytes(b"")
    jpeg = (root / "b.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.txt").write_text("not an image extension: ignored\n")
    return root


def _predict(run: Path, task: str, images: Path, out: Path, *extra: str) -> list[dict]:
    argv = ["predict", str(run), "--task", task, str(images), "--out", str(out), "--batch-size", "2",
            "--no-progress", *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _reference_input(run, task: str, path: Path, target: dict) -> torch.Tensor:
    """``path`` through the task type's own validation transform of the run's config: ``[1, 3, S, S]``."""
    cfg = next(t for t in run.cfg.tasks if t.name == task)
    image = tv_tensors.Image(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    x, _ = TASK_TYPES.get(cfg.type).val_transform(cfg)(image, target)
    return x.as_subclass(torch.Tensor)[None]


@pytest.fixture(scope="module")
def loaded(sharp_run: Path):
    return load_pretrained(sharp_run)


def test_classification_and_multilabel_equal_the_routed_model(sharp_run, loaded, images, tmp_path):
    records = _predict(sharp_run, "classification", images, tmp_path / "cls")
    assert [Path(r["file"]).relative_to(images).as_posix() for r in records] == [g[0] for g in GOOD]
    classes = loaded.specs["classification"].classes
    for record in records:
        with torch.no_grad():
            probs = loaded.model(_reference_input(loaded, "classification", Path(record["file"]), {}),
                                 "classification").softmax(-1)[0]
        top = probs.topk(5)
        assert record["class_id"] == int(probs.argmax()) and record["label"] == classes[record["class_id"]]
        assert record["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert [t["class_id"] for t in record["top5"]] == top.indices.tolist()
        assert [t["score"] for t in record["top5"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    records = _predict(sharp_run, "multilabel", images, tmp_path / "ml", "--score-threshold", "0.5")
    names = loaded.specs["multilabel"].classes
    for record in records:
        with torch.no_grad():
            probs = torch.sigmoid(loaded.model(_reference_input(loaded, "multilabel", Path(record["file"]), {}),
                                               "multilabel"))[0]
        assert [record["scores"][n] for n in names] == pytest.approx(probs.tolist(), abs=1e-5)
        assert record["positive"] == [n for n, p in zip(names, probs.tolist()) if p >= 0.5]


def test_detection_boxes_are_the_heads_scaled_to_original_pixels(sharp_run, loaded, images, tmp_path):
    records = _predict(sharp_run, "detection", images, tmp_path / "det")
    head = loaded.model.heads["detection"]
    for record, (_, h, w) in zip(records, GOOD):
        empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                 "labels": torch.zeros(0, dtype=torch.int64)}
        x = _reference_input(loaded, "detection", Path(record["file"]), empty)
        with torch.no_grad():
            out = loaded.model(x, "detection")
            boxes, scores, labels = head._decode_image(out["cls_logits"][0], out["box_ltrb"][0],
                                                       out["centerness"][0], out, (32, 32))
        expected = boxes * torch.tensor([w / 32, h / 32, w / 32, h / 32])  # plain resize of the whole image
        expected[:, 0::2] = expected[:, 0::2].clamp(0, w)
        expected[:, 1::2] = expected[:, 1::2].clamp(0, h)
        got = torch.tensor([d["box"] for d in record["detections"]]).reshape(-1, 4)
        assert len(got) == len(expected) > 0
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert [d["class_id"] for d in record["detections"]] == labels.tolist()
        assert [d["score"] for d in record["detections"]] == pytest.approx(scores.tolist(), abs=1e-5)
        assert bool((got[:, 0::2] <= w).all() and (got[:, 1::2] <= h).all() and (got >= 0).all())
        drawn = Image.open(tmp_path / "det" / record["image"])
        assert drawn.size == (w, h) and drawn.mode == "RGB"
    threshold = float(np.median([d["score"] for r in records for d in r["detections"]]))
    kept = _predict(sharp_run, "detection", images, tmp_path / "det_t", "--score-threshold", str(threshold))
    for full, part in zip(records, kept):
        assert part["detections"] == [d for d in full["detections"] if d["score"] >= threshold]


def test_segmentation_mask_is_the_letterbox_logits_resized_to_the_original(sharp_run, loaded, images, tmp_path):
    records = _predict(sharp_run, "segmentation", images, tmp_path / "seg")
    classes = loaded.specs["segmentation"].classes
    seen = set()
    for record, (_, h, w) in zip(records, GOOD):
        target = {"mask": tv_tensors.Mask(torch.zeros(h, w, dtype=torch.uint8))}
        x = _reference_input(loaded, "segmentation", Path(record["file"]), target)
        with torch.no_grad():
            logits = loaded.model(x, "segmentation")
        new_h, new_w = round(h * 32 / max(h, w)), round(w * 32 / max(h, w))  # letterbox: pad right / bottom
        expected = F.interpolate(logits[..., :new_h, :new_w], size=(h, w), mode="bilinear",
                                 align_corners=False).argmax(1)[0]
        png = Image.open(tmp_path / "seg" / record["mask"])
        assert png.mode == "L" and png.size == (w, h)
        mask = torch.from_numpy(np.array(png)).long()
        assert torch.equal(mask, expected)
        share = torch.bincount(mask.reshape(-1), minlength=len(classes)).float() / (h * w)
        assert record["class_share"] == pytest.approx(
            {classes[c]: round(float(s), 6) for c, s in enumerate(share) if s > 0}, abs=1e-6)
        seen.update(mask.unique().tolist())
    assert len(seen) > 1  # the sharpened head predicts several classes, so the check above can fail


def test_keypoints_in_original_pixels(sharp_run, loaded, images, tmp_path):
    records = _predict(sharp_run, "keypoints", images, tmp_path / "kp")
    head = loaded.model.heads["keypoints"]
    k = head.num_keypoints
    for record, (_, h, w) in zip(records, GOOD):
        x = _reference_input(loaded, "keypoints", Path(record["file"]), {"keypoints": torch.zeros(k, 3)})
        with torch.no_grad():
            heatmaps = loaded.model(x, "keypoints")
        from gppf.heads.keypoints import heatmap_argmax

        xy, conf = heatmap_argmax(heatmaps, stride=head.stride)
        expected = torch.cat([xy[0] * torch.tensor([w / 32, h / 32]), conf[0, :, None]], 1)
        (instance,) = record["instances"]
        got = torch.tensor([[p["x"], p["y"], p["score"]] for p in instance["keypoints"]])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert instance["score"] == pytest.approx(float(conf.mean()), abs=1e-5)
        assert bool(((got[:, 0] >= 0) & (got[:, 0] <= w) & (got[:, 1] >= 0) & (got[:, 1] <= h)).all())
        assert Image.open(tmp_path / "kp" / record["image"]).size == (w, h)


def test_reid_embeddings_rows_follow_files_txt(sharp_run, loaded, images, tmp_path):
    records = _predict(sharp_run, "reid", images, tmp_path / "reid")
    files = (tmp_path / "reid" / "files.txt").read_text().splitlines()
    assert files == [r["file"] for r in records] and [r["embedding_row"] for r in records] == [0, 1, 2]
    emb = np.load(tmp_path / "reid" / "embeddings.npy")
    head = loaded.model.heads["reid"]
    for row, file in zip(emb, files):
        x = _reference_input(loaded, "reid", Path(file), {})
        with torch.no_grad():
            expected = head.predict(loaded.model(x, "reid"), Batch(images=x, targets=[{}]))[0]
        np.testing.assert_allclose(row, expected.numpy(), atol=1e-5)
        assert np.linalg.norm(row) == pytest.approx(1.0, abs=1e-5)


def test_corrupt_files_are_named_skipped_and_counted(sharp_run, images, tmp_path, capsys):
    _predict(sharp_run, "classification", images, tmp_path / "out")
    captured = capsys.readouterr()
    for name in BAD:
        assert f"skipped {images / name}" in captured.err
    assert "notes.txt" not in captured.err + captured.out
    assert "6 images found, 3 predicted, 3 skipped" in captured.out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["found"], summary["predicted"], summary["skipped"]) == (6, 3, 3)
    assert sorted(Path(s["file"]).name for s in summary["skipped_files"]) == sorted(BAD)
    assert {"empty" in s["reason"] for s in summary["skipped_files"] if s["file"].endswith("empty.png")} == {True}


def test_grey_and_rgba_images_are_read_as_rgb(sharp_run, images, tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    rgb = Image.open(images / "a.png").convert("RGB")
    grey = rgb.convert("L")
    grey.save(folder / "grey.png")
    grey.convert("RGB").save(folder / "grey_as_rgb.png")
    rgba = rgb.copy()
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    rgb.save(folder / "rgb.png")
    records = {Path(r["file"]).name: r for r in _predict(sharp_run, "reid", folder, tmp_path / "out")}
    emb = np.load(tmp_path / "out" / "embeddings.npy")
    row = {name: emb[r["embedding_row"]] for name, r in records.items()}
    assert len(records) == 4
    np.testing.assert_allclose(row["grey.png"], row["grey_as_rgb.png"], atol=1e-6)
    np.testing.assert_allclose(row["rgba.png"], row["rgb.png"], atol=1e-6)  # alpha dropped, colours kept
    assert float(np.abs(row["grey.png"] - row["rgb.png"]).max()) > 1e-3  # colour matters to the model


def test_find_images_recurses_sorted_and_once(images):
    from gppf.transfer.predict import find_images

    listed = ["a.png", "b.jpg", "bad.jpg", "empty.png", "sub/c.png", "trunc.jpg"]
    again = [images / "sub" / ".." / "a.png", images / "notes.txt"]  # a duplicate; a file named explicitly
    found = find_images([images, *again])
    assert [p.relative_to(images).as_posix() for p in found] == [*listed, "notes.txt"]


def test_user_mistakes_are_one_line_errors(sharp_run, images, tmp_path, capsys):
    base = ["predict", str(sharp_run), "--no-progress", "--out", str(tmp_path / "o")]
    assert main([*base, "--task", "nope", str(images)]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "classification, multilabel, detection" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert main([*base, "--task", "classification", str(tmp_path / "empty")]) == 1
    assert "no images found" in capsys.readouterr().err
    assert main([*base, "--task", "classification", str(tmp_path / "missing.png")]) == 1
    assert "missing.png: no such file or directory" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--task", "classification", str(images), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "tasks.json" in err and "Traceback" not in err


def _close(a, b) -> None:
    """Equal JSON records up to float rounding (the dense model sums in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-4)
    else:
        assert a == b


@pytest.mark.parametrize("task", ["classification", "multilabel", "detection", "segmentation", "keypoints", "reid"])
def test_extracted_file_predicts_like_the_run_directory(sharp_run, images, tmp_path, task):
    from gppf.transfer.extract_task import extract_task_model

    model_file = tmp_path / f"{task}.safetensors"
    extract_task_model(sharp_run, task=task, out=model_file)
    from_run = _predict(sharp_run, task, images, tmp_path / "run")
    from_file = _predict(model_file, task, images, tmp_path / "file")
    assert len(from_run) == len(GOOD)
    _close(from_run, from_file)
    for name in ("masks", "boxes", "keypoints"):
        for png in sorted((tmp_path / "run" / name).glob("*.png")):
            a, b = np.array(Image.open(png)), np.array(Image.open(tmp_path / "file" / name / png.name))
            assert (a != b).mean() < 0.01  # masks: argmax ties aside; drawings: label text equal up to rounding
    if task == "reid":
        np.testing.assert_allclose(np.load(tmp_path / "run" / "embeddings.npy"),
                                   np.load(tmp_path / "file" / "embeddings.npy"), atol=1e-4)


def test_extracted_file_names_its_one_task(sharp_run, images, tmp_path, capsys):
    from gppf.transfer.extract_task import extract_task_model

    model_file = tmp_path / "seg.safetensors"
    extract_task_model(sharp_run, task="segmentation", out=model_file)
    assert main(["predict", str(model_file), "--task", "reid", str(images), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'reid'" in err and "(known tasks: segmentation)" in err
