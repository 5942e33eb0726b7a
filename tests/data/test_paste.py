"""``gppf data paste``: IDX parsing, exact boxes/masks, COCO / mask-PNG / CSV outputs."""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from gppf.data.base import DataError
from gppf.data.paste import FMNIST_CLASSES, FMNIST_FILES, build_paste_dataset, main_paste, read_idx

# pycocotools' own decode() trips a numpy-2 DeprecationWarning that is not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> None:
    header = magic or bytes([0, 0, 8, array.ndim])
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload))


def fake_fmnist(root: Path, *, n: int = 24) -> Path:
    """Tiny Fashion-MNIST look-alike: bright rectangles (with a dark hole) on black, labels 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, (images_name, labels_name) in FMNIST_FILES.items():
        items = np.zeros((n, 28, 28), dtype=np.uint8)
        for k in range(n):
            y0, x0 = rng.integers(1, 8, size=2)
            items[k, y0:y0 + 16 + k % 4, x0:x0 + 12 + k % 6] = rng.integers(120, 255)
            items[k, y0 + 5:y0 + 8, x0 + 4:x0 + 7] = 0  # an interior hole: the cut-out fills it
        write_idx(root / images_name, items)
        write_idx(root / labels_name, np.arange(n) % 10)
    return root


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def pasted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("paste")
    summary = build_paste_dataset(fmnist_root=fake_fmnist(tmp / "fm"), out=tmp / "out", num_train=12, num_val=6,
                                  size=48, max_objects=3, seed=1, backgrounds=None)
    return tmp / "out", summary


def test_coco_json_loads_and_masks_match_boxes(pasted: tuple[Path, dict]) -> None:
    out, summary = pasted
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6
    for split in ("train", "val"):
        coco = load_coco(out / "annotations" / f"instances_{split}.json")
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(FMNIST_CLASSES)
        assert coco.getCatIds() == list(range(1, 11))
        assert len(coco.getImgIds()) == summary["splits"][split]["images"]
        assert len(coco.getAnnIds()) == summary["splits"][split]["objects"] >= len(coco.getImgIds())
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.loadImgs(ann["image_id"])[0]
            assert (out / "images" / split / img["file_name"]).is_file()
            mask = coco.annToMask(ann).astype(bool)
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and ann["area"] == mask.sum() > 0
            assert mask[y:y + h, x:x + w].sum() == mask.sum()  # nothing outside the box
            assert mask[y:y + h, x].any() and mask[y:y + h, x + w - 1].any()  # tight left/right
            assert mask[y, x:x + w].any() and mask[y + h - 1, x:x + w].any()  # tight top/bottom
            assert list(mask_utils.toBbox(coco.annToRLE(ann))) == [x, y, w, h]


def test_mask_pngs_agree_with_coco_and_csv(pasted: tuple[Path, dict]) -> None:
    out, _ = pasted
    assert (out / "classes.txt").read_text().splitlines() == ["background", *FMNIST_CLASSES]
    coco = load_coco(out / "annotations" / "instances_val.json")
    rows = list(csv.reader((out / "multilabel_val.csv").open()))
    assert rows[0] == ["image", *FMNIST_CLASSES]
    by_name = {r[0]: [int(v) for v in r[1:]] for r in rows[1:]}
    for img in coco.loadImgs(coco.getImgIds()):
        label_png = np.asarray(Image.open(out / "val" / "labels" / img["file_name"]))
        rgb = np.asarray(Image.open(out / "val" / "images" / img["file_name"]))
        assert label_png.dtype == np.uint8 and rgb.shape == (48, 48, 3) and label_png.shape == (48, 48)
        expected = np.zeros((48, 48), dtype=np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            m = coco.annToMask(ann).astype(bool)
            assert not (expected[m] > 0).any()  # visible masks are disjoint
            expected[m] = ann["category_id"]
        np.testing.assert_array_equal(label_png, expected)
        present = {int(c) - 1 for c in np.unique(expected) if c}
        assert by_name[f"images/val/{img['file_name']}"] == [int(c in present) for c in range(10)]


def test_pasted_items_are_exact_cutouts(tmp_path: Path) -> None:
    """On a one-colour background, the pasted pixels are exactly the union of the masks."""
    bg_dir = tmp_path / "bg"
    bg_dir.mkdir()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(bg_dir / "plain.png")
    build_paste_dataset(fmnist_root=fake_fmnist(tmp_path / "fm"), out=tmp_path / "out", num_train=4, num_val=2,
                        size=40, max_objects=2, seed=0, backgrounds=bg_dir)
    for name in ("000000.png", "000001.png", "000002.png"):
        rgb = np.asarray(Image.open(tmp_path / "out" / "train" / "images" / name)).astype(int)
        labels = np.asarray(Image.open(tmp_path / "out" / "train" / "labels" / name))
        changed = np.abs(rgb - np.array([10, 200, 30])).sum(axis=-1) > 0
        np.testing.assert_array_equal(changed, labels > 0)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    fm = fake_fmnist(tmp_path / "fm")
    kw = dict(fmnist_root=fm, num_train=3, num_val=2, size=32, max_objects=3, backgrounds=None)
    build_paste_dataset(out=tmp_path / "a", seed=5, **kw)
    build_paste_dataset(out=tmp_path / "b", seed=5, **kw)
    build_paste_dataset(out=tmp_path / "c", seed=6, **kw)
    read = lambda d: (tmp_path / d / "train" / "images" / "000002.png").read_bytes()  # noqa: E731
    assert read("a") == read("b") != read("c")


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    write_idx(bad, np.zeros((2, 3), dtype=np.uint8), magic=b"\x00\x00\x0d\x02")
    with pytest.raises(DataError, match=r"bad\.gz: not an unsigned-byte IDX file"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(bytes([0, 0, 8, 2]) + struct.pack(">2I", 4, 4) + b"\x00" * 3))
    with pytest.raises(DataError, match=r"short\.gz: IDX payload has 3 bytes"):
        read_idx(short)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"hello")
    with pytest.raises(DataError, match="plain.gz: cannot read IDX file"):
        read_idx(not_gzip)
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "ok.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "ok.gz"), arr)


def test_missing_inputs_and_bad_args(tmp_path: Path) -> None:
    fm = fake_fmnist(tmp_path / "fm")
    kw = dict(out=tmp_path / "o", num_train=2, num_val=2, size=32, max_objects=2, seed=0)
    with pytest.raises(DataError, match="Fashion-MNIST folder not found"):
        build_paste_dataset(fmnist_root=tmp_path / "nope", backgrounds=None, **kw)
    (fm / FMNIST_FILES["val"][1]).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        build_paste_dataset(fmnist_root=fm, backgrounds=None, **kw)
    with pytest.raises(DataError, match="backgrounds folder has no images"):
        build_paste_dataset(fmnist_root=fm, backgrounds=tmp_path / "fm", **kw)
    with pytest.raises(DataError, match="size must be >= 32"):
        build_paste_dataset(fmnist_root=fm, backgrounds=None, **{**kw, "size": 16})


def test_main_paste_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fm = fake_fmnist(tmp_path / "fm")
    out = tmp_path / "cli"
    rc = main_paste(["--fmnist", str(fm), "--out", str(out), "--num-train", "3", "--num-val", "2",
                     "--size", "32", "--max-objects", "2", "--seed", "7"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["splits"]["train"]["images"] == 3
    assert json.loads((out / "summary.json").read_text())["size"] == 32
    assert main_paste(["--fmnist", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "Fashion-MNIST folder not found" in capsys.readouterr().err


def _real_fmnist() -> Path | None:
    candidates = [Path(os.environ["GPPF_DATA"]) / "fashion-mnist"] if os.environ.get("GPPF_DATA") else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion-mnist")
    return next((c for c in candidates if (c / FMNIST_FILES["train"][0]).is_file()), None)


@pytest.mark.realdata
def test_real_fashion_mnist(tmp_path: Path) -> None:
    root = _real_fmnist()
    if root is None:
        pytest.skip("Fashion-MNIST not found ($GPPF_DATA/fashion-mnist or ../shared/data/fashion-mnist)")
    summary = build_paste_dataset(fmnist_root=root, out=tmp_path, num_train=30, num_val=10, size=64,
                                  max_objects=4, seed=0, backgrounds=None)
    coco = load_coco(tmp_path / "annotations" / "instances_train.json")
    assert len(coco.getImgIds()) == 30 and summary["splits"]["train"]["objects"] >= 30
    areas = [a["area"] for a in coco.loadAnns(coco.getAnnIds())]
    assert min(areas) >= 12 and np.median(areas) > 150  # real items are substantial cut-outs
    assert sum(1 for c in summary["splits"]["train"]["per_class"] if c) >= 6
