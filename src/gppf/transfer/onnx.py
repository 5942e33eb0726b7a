"""ONNX export of an extracted task model, and the numpy post-processing of detection outputs.

``export_onnx(model, out)`` writes one graph: input ``images`` ``[B, 3, S, S]`` (normalised with the
sidecar's mean/std, ``S`` = its ``image_size``), the head's raw outputs as named tensors (see
``output_names``; detection before decoding and NMS), and the sidecar JSON in the model's
``metadata_props`` under ``gppf_task_model``. Needs the ``export`` extra (onnx, onnxscript; onnxruntime
to run it). Post-processing of detection: ``postprocess_detection`` (docs/deploy.md).
"""
from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gppf.transfer.task_model import TaskModel

__all__ = ["METADATA_KEY", "export_onnx", "output_names", "postprocess_detection"]

METADATA_KEY = "gppf_task_model"
_TENSOR_NAMES = {"classification": "logits", "multilabel": "logits", "segmentation": "logits",
                 "keypoints": "heatmaps"}
_BATCHLESS = ("points", "point_strides")  # detection outputs that do not depend on the image


def output_names(model: TaskModel, outputs: Any) -> list[str]:
    """Names of the flattened raw outputs: a dict head's keys in its order, else one name per type."""
    if isinstance(outputs, Tensor):
        return [_TENSOR_NAMES.get(model.spec.type, "output")]
    if isinstance(outputs, Mapping):
        return list(outputs)
    raise TypeError(f"cannot name the outputs of the '{model.spec.type}' head ({type(outputs).__name__})")


class _FlatOutputs(nn.Module):
    """``images -> tuple`` of the task model's raw outputs, in ``names`` order."""

    def __init__(self, model: TaskModel, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images)
        return (out,) if isinstance(out, Tensor) else tuple(out[n] for n in self.names)


def export_onnx(model: TaskModel, out: Path | str, *, opset: int = 18, dynamic_batch: bool = False,
                exporter: str = "dynamo") -> list[str]:
    """Export ``model`` (eval mode, input ``image_size`` square) to ``out``; returns the output names.

    ``exporter``: ``dynamo`` (default; ``torch.export`` + onnxscript, torch's maintained exporter) or
    ``torchscript`` (the legacy tracer, deprecated in torch 2.9+ but ~10-20x faster to export).
    ``dynamic_batch``: the batch dimension is symbolic (``batch``), else fixed at 1.
    """
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be dynamo|torchscript, got {exporter!r}")
    needed = ["onnx"] + (["onnxscript"] if exporter == "dynamo" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'gppf[export]'")
    import onnx

    model = model.eval()
    size = int(model.spec.image_size)
    example = torch.zeros(2 if dynamic_batch else 1, 3, size, size, device=next(model.parameters()).device)
    with torch.no_grad():  # torch.export specialises a size-1 dimension: trace a dynamic batch at 2
        names = output_names(model, model(example))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _FlatOutputs(model, names).eval()
    if exporter == "dynamo":
        dynamic = {"images": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
        program = torch.onnx.export(wrapper, (example,), input_names=["images"], output_names=names,
                                    opset_version=opset, dynamo=True, dynamic_shapes=dynamic, verbose=False)
        proto = program.model_proto
    else:
        axes = {n: {0: "batch"} for n in ["images", *names] if n not in _BATCHLESS} if dynamic_batch else None
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
            torch.onnx.export(wrapper, (example,), buffer, input_names=["images"], output_names=names,
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
        proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {METADATA_KEY: model.spec.to_json()})
    onnx.save(proto, str(out))
    return names


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Indices kept by greedy NMS (IoU > ``thresh`` suppressed), in decreasing score order."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / (area[i] + area[rest] - inter)
        order = rest[iou <= thresh]
    return np.asarray(keep, dtype=np.int64)


def _decode_image(cls: np.ndarray, ltrb: np.ndarray, ctr: np.ndarray, points: np.ndarray, strides: np.ndarray,
                  *, score_thresh: float, topk_per_level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per level: candidates with class probability > ``score_thresh``, the ``topk_per_level`` best
    by ``sqrt(prob * sigmoid(centerness))``, decoded to XYXY input pixels."""
    probs = _sigmoid(cls.astype(np.float64))
    scores_all = np.sqrt(probs * _sigmoid(ctr.astype(np.float64))[:, None])
    num_classes = cls.shape[1]
    boxes, scores, labels = [], [], []
    for stride in np.unique(strides):
        level = strides == stride
        flat_idx = np.flatnonzero(probs[level] > score_thresh)
        level_scores = scores_all[level].reshape(-1)[flat_idx]
        order = np.argsort(-level_scores, kind="stable")[:topk_per_level]
        flat_idx, point_idx = flat_idx[order], flat_idx[order] // num_classes
        x, y = points[level][point_idx, 0], points[level][point_idx, 1]
        d = ltrb[level][point_idx]
        boxes.append(np.stack([x - d[:, 0], y - d[:, 1], x + d[:, 2], y + d[:, 3]], axis=1))
        scores.append(level_scores[order])
        labels.append(flat_idx % num_classes)
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)


def postprocess_detection(outputs: Mapping[str, np.ndarray], *, input_size: tuple[int, int],
                          orig_sizes: Sequence[tuple[int, int]] | None = None, score_thresh: float = 0.05,
                          nms_thresh: float = 0.6, topk_per_level: int = 1000,
                          max_detections: int = 100) -> list[dict[str, np.ndarray]]:
    """Detections per image from the exported detection outputs, as ``FCOSHead.predict``.

    ``outputs``: ``cls_logits [B, N, C]``, ``box_ltrb [B, N, 4]``, ``centerness [B, N]``, ``points [N, 2]``,
    ``point_strides [N]`` (the ONNX graph's outputs by name). ``input_size``: (H, W) of the network input.
    ``orig_sizes``: per image (H, W) of the original image the input was resized from (default: the input
    size); boxes are scaled to it and clipped. Thresholds: the sidecar's ``head_args`` (same names).
    Returns per image ``boxes [n, 4]`` XYXY float32, ``scores [n]`` float32, ``labels [n]`` int64, best first.
    """
    results = []
    for i in range(outputs["cls_logits"].shape[0]):
        boxes, scores, labels = _decode_image(
            outputs["cls_logits"][i], outputs["box_ltrb"][i].astype(np.float64), outputs["centerness"][i],
            outputs["points"].astype(np.float64), outputs["point_strides"], score_thresh=score_thresh,
            topk_per_level=topk_per_level)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, input_size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, input_size[0])
        offset = labels[:, None] * (boxes.max(initial=0.0) + 1.0)  # per-class NMS in one pass (torchvision)
        keep = _nms(boxes + offset, scores, nms_thresh)[:max_detections]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        orig_h, orig_w = orig_sizes[i] if orig_sizes is not None else input_size
        boxes = boxes * np.array([orig_w / input_size[1], orig_h / input_size[0]] * 2)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, orig_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, orig_h)
        results.append({"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32),
                        "labels": labels.astype(np.int64)})
    return results
