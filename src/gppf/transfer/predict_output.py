"""Writing ``gppf predict`` results under ``--out DIR`` (see ``docs/predict.md``).

* ``predictions.jsonl``: one JSON object per predicted image, in input order: ``file``, ``task``,
  ``type`` and the type's results (all coordinates in ORIGINAL image pixels):
  classification ``label``, ``class_id``, ``score`` (softmax) and ``top5``; multilabel ``scores``
  (class -> sigmoid probability) and ``positive`` (classes with score >= threshold, default 0.5);
  detection ``detections`` (``box`` XYXY, ``label``, ``class_id``, ``score``) and ``image`` (a copy
  with the boxes drawn, under ``boxes/``); segmentation ``mask`` (PNG of class ids, original size, under
  ``masks/``) and ``class_share`` (fraction of pixels per class); keypoints ``instances`` (one per image:
  the image is the top-down crop) with ``keypoints`` (``x``, ``y``, ``score``) and ``image`` (drawn,
  under ``keypoints/``); reid ``embedding_row`` (row of ``embeddings.npy``).
* ``files.txt``: the predicted files, one a line, in the order of ``predictions.jsonl`` (and of the rows
  of ``embeddings.npy`` for reid).
* ``summary.json``: counts and the skipped files with their reason (written by ``run_predict``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_keypoints

from gppf.transfer.pretrained import TaskSpec

__all__ = ["PredictionWriter", "mask_png", "output_name"]

DEFAULT_MULTILABEL_THRESHOLD = 0.5
_DRAWN = {"detection": "boxes", "keypoints": "keypoints"}


def output_name(index: int, file: Path) -> str:
    """Unique, readable file name of an output derived from input ``index`` (``00003_cat.png``)."""
    return f"{index:05d}_{file.stem}.png"


def mask_png(mask_HW: Tensor, path: Path) -> None:
    """Save class ids as a single-channel PNG (8-bit, 16-bit when a class id exceeds 255)."""
    arr = mask_HW.cpu().numpy()
    dtype = np.uint8 if arr.size == 0 or arr.max() <= 255 else np.uint16
    Image.fromarray(arr.astype(dtype)).save(path)


def _save_rgb(image_3HW: Tensor, path: Path) -> None:
    Image.fromarray(image_3HW.permute(1, 2, 0).cpu().numpy()).save(path)


class PredictionWriter:
    """Streams one task's results to ``out`` (a context manager; ``count``: images written)."""

    def __init__(self, out: Path, *, spec: TaskSpec, score_threshold: float | None = None) -> None:
        self.out, self.spec, self.threshold = Path(out), spec, score_threshold
        self.kind = spec.type
        self.count = 0
        self._embeddings: list[np.ndarray] = []
        self.out.mkdir(parents=True, exist_ok=True)
        for sub in (_DRAWN.get(self.kind), "masks" if self.kind == "segmentation" else None):
            if sub:
                (self.out / sub).mkdir(exist_ok=True)
        self._jsonl = open(self.out / "predictions.jsonl", "w", buffering=1)  # noqa: SIM115
        self._files = open(self.out / "files.txt", "w", buffering=1)  # noqa: SIM115

    @property
    def needs_original(self) -> bool:
        """Whether the decoded original images are needed (to draw on them)."""
        return self.kind in _DRAWN

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._jsonl.closed:
            return
        self._jsonl.close()
        self._files.close()
        if self.kind == "reid":
            emb = np.concatenate(self._embeddings) if self._embeddings else np.zeros((0, 0), np.float32)
            np.save(self.out / "embeddings.npy", emb.astype(np.float32))

    def _class(self, class_id: int) -> str:
        classes = self.spec.classes
        return classes[class_id] if 0 <= class_id < len(classes) else str(class_id)

    def write_batch(self, files: Sequence[Path], loaded: Any, preds: Any) -> None:
        """Write the results of one batch (``loaded``: ``gppf.transfer.predict.Loaded``)."""
        for j, file in enumerate(files):
            index = loaded.indices[j]
            record = {"file": str(file), "task": self.spec.name, "type": self.kind}
            record.update(self._result(j, index, file, loaded.originals[j], preds))
            self._jsonl.write(json.dumps(record) + "\n")
            self._files.write(f"{file}\n")
            self.count += 1

    def _result(self, j: int, index: int, file: Path, original: Tensor | None, preds: Any) -> dict[str, Any]:
        kind = self.kind
        if kind == "classification":
            return self._classification(preds[j])
        if kind == "multilabel":
            return self._multilabel(preds[j])
        if kind == "detection":
            return self._detection(preds[j], original, output_name(index, file))
        if kind == "segmentation":
            return self._segmentation(preds[j], output_name(index, file))
        if kind == "keypoints":
            return self._keypoints(preds["keypoints"][j], float(preds["scores"][j]), original, output_name(index, file))
        if kind == "reid":
            self._embeddings.append(preds[j : j + 1].detach().float().cpu().numpy())
            return {"embedding_row": self.count, "embedding_dim": int(preds.shape[1])}
        raise ValueError(f"gppf predict: no output format for task type '{kind}'")

    def _classification(self, logits_C: Tensor) -> dict[str, Any]:
        probs_C = logits_C.float().softmax(-1).cpu()
        scores, ids = probs_C.topk(min(5, probs_C.numel()))
        top = [{"label": self._class(int(c)), "class_id": int(c), "score": float(s)} for s, c in zip(scores, ids)]
        return {**top[0], "top5": top}

    def _multilabel(self, probs_C: Tensor) -> dict[str, Any]:
        threshold = DEFAULT_MULTILABEL_THRESHOLD if self.threshold is None else self.threshold
        scores = {self._class(c): float(p) for c, p in enumerate(probs_C.cpu().tolist())}
        return {"scores": scores, "positive": [name for name, p in scores.items() if p >= threshold],
                "threshold": threshold}

    def _detection(self, pred: dict[str, Tensor], original: Tensor | None, name: str) -> dict[str, Any]:
        boxes, scores, labels = pred["boxes"].cpu(), pred["scores"].cpu(), pred["labels"].cpu()
        if self.threshold is not None:
            keep = scores >= self.threshold
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        names = [self._class(int(c)) for c in labels]
        dets = [{"box": [float(v) for v in box], "label": n, "class_id": int(c), "score": float(s)}
                for box, n, c, s in zip(boxes, names, labels, scores)]
        if original is not None:
            texts = [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]
            drawn = draw_bounding_boxes(original, boxes, labels=texts or None, colors="red", width=2)
            _save_rgb(drawn, self.out / "boxes" / name)
        return {"detections": dets, "image": f"boxes/{name}"}

    def _segmentation(self, mask_HW: Tensor, name: str) -> dict[str, Any]:
        mask_png(mask_HW, self.out / "masks" / name)
        counts = torch.bincount(mask_HW.reshape(-1).cpu().long(), minlength=len(self.spec.classes))
        share = (counts.float() / max(mask_HW.numel(), 1)).tolist()
        return {"mask": f"masks/{name}", "size": [int(mask_HW.shape[0]), int(mask_HW.shape[1])],
                "class_share": {self._class(c): round(v, 6) for c, v in enumerate(share) if v > 0}}

    def _keypoints(self, kpts_K3: Tensor, score: float, original: Tensor | None, name: str) -> dict[str, Any]:
        kpts_K3 = kpts_K3.float().cpu()
        points = [{"x": float(x), "y": float(y), "score": float(s)} for x, y, s in kpts_K3.tolist()]
        if original is not None:
            visible = None if self.threshold is None else (kpts_K3[None, :, 2] >= self.threshold)
            drawn = draw_keypoints(original, kpts_K3[None, :, :2], colors="red", radius=2, visibility=visible)
            _save_rgb(drawn, self.out / "keypoints" / name)
        instance = {"score": score, "keypoints": points}
        return {"instances": [instance], "image": f"keypoints/{name}"}
