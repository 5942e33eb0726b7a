"""Inference on image files: ``gppf predict RUN_DIR|FILE --task NAME IMAGES_OR_DIR... [--out DIR]``.

Images (files, or directories searched recursively for the common image extensions) are decoded with
PIL to RGB (``gppf.data.readers.images.load_rgb``: stored pixel grid, EXIF orientation not applied, as in
training), preprocessed exactly like the task's validation split (``build_val_transform`` with the task
type's ``val_mode``, the spec's ``image_size`` and its ``mean``/``std``), batched and run through the
model. Raw outputs go through the head's own ``predict(outputs, batch)``, so results have ``gppf eval``
semantics, and are mapped back to ORIGINAL image pixels: the batch targets carry ``orig_size``,
``scale`` (input -> original, read by the detection head) and ``crop_box`` (the original-pixel frame
of the network input, read by the keypoint head), all derived from where the transform put the whole
image (an ``extent`` box sent through the same transform), so resize and letterbox both map back
exactly. Segmentation logits are cropped to that extent and resized to the original size by the head.

A corrupt or unreadable image is named on stderr, counted and skipped; it is never fatal. Writing the
results is ``gppf.transfer.predict_output``.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from gppf.data.collate import Batch, collate_batch
from gppf.data.readers.common import SampleError
from gppf.data.readers.images import IMAGE_EXTENSIONS, is_image_file, load_rgb
from gppf.data.transforms import build_val_transform
from gppf.transfer.pretrained import TaskSpec

__all__ = [
    "PredictError", "PredictSummary", "TaskPredictor", "find_images", "load_predictor", "predict_images",
    "preprocess_transform", "print_summary", "run_predict",
]


class PredictError(RuntimeError):
    """A user mistake (unknown task, no images, unreadable model source); the message says which."""


@dataclass
class TaskPredictor:
    """One task's model ready for inference: ``forward(images_BCHW) -> raw head outputs`` and the head
    whose ``predict`` post-processes them; ``spec`` gives type, classes, input size and normalisation."""

    task: str
    spec: TaskSpec
    forward: Callable[[Tensor], Any]
    head: nn.Module
    device: torch.device


def _unknown_task(task: str, known: Sequence[str], where: Path) -> PredictError:
    return PredictError(f"unknown task '{task}' in {where} (known tasks: {', '.join(known)})")


def load_predictor(source: Path | str, *, task: str, device: str | torch.device = "cpu") -> TaskPredictor:
    """A run directory (``load_pretrained``) or a ``.safetensors`` file of ``gppf extract``
    (``gppf.load_task_model``) as a :class:`TaskPredictor` for ``task``."""
    source, device = Path(source), torch.device(device)
    if source.is_dir():
        from gppf.transfer.pretrained import load_pretrained, read_task_specs

        specs = read_task_specs(source)  # cheap check before the model is built
        if task not in specs:
            raise _unknown_task(task, list(specs), source / "tasks.json")
        pre = load_pretrained(source, device=device)
        model = pre.model
        return TaskPredictor(task=task, spec=pre.specs[task], forward=lambda x: model(x, task),
                             head=model.heads[task], device=device)
    if source.is_file():
        return _file_predictor(source, task=task, device=device)
    raise PredictError(f"{source}: no such run directory or model file")


def _file_predictor(path: Path, *, task: str, device: torch.device) -> TaskPredictor:
    """A task model extracted by ``gppf extract`` (``gppf.load_task_model``; ``FILE.json`` sidecar)."""
    from gppf.transfer.task_model import TaskModelError, load_task_model

    try:
        model = load_task_model(path, device=device)
    except TaskModelError as exc:
        raise PredictError(str(exc)) from exc
    if task != model.spec.name:
        raise _unknown_task(task, [model.spec.name], path)
    return TaskPredictor(task=task, spec=model.spec, forward=model, head=model.head, device=device)


def find_images(inputs: Sequence[Path | str]) -> list[Path]:
    """Files named in ``inputs`` (any extension) plus the image files under each directory (recursive,
    sorted), first occurrence kept. A missing input raises ``PredictError``; so does finding nothing."""
    found: dict[Path, Path] = {}  # resolved -> as given
    for item in map(Path, inputs):
        if item.is_dir():
            hits = sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p))
        elif item.is_file():
            hits = [item]
        else:
            raise PredictError(f"{item}: no such file or directory")
        for hit in hits:
            found.setdefault(hit.resolve(), hit)
    if not found:
        raise PredictError(f"no images found in {', '.join(map(str, inputs))} (looked recursively for "
                           f"{' '.join(IMAGE_EXTENSIONS)})")
    return list(found.values())


def preprocess_transform(spec: TaskSpec) -> v2.Compose:
    """The task's validation pipeline (geometry ``val_mode`` of its type, ``image_size``), normalised
    with the spec's ``mean``/``std``; called as ``tf(image, target)`` like every gppf pipeline."""
    from gppf.registry import TASK_TYPES

    task_type = TASK_TYPES.get(spec.type)
    steps = list(build_val_transform(image_size=spec.image_size, mode=task_type.val_mode).transforms)
    if not isinstance(steps[-1], v2.Normalize):
        raise PredictError("build_val_transform no longer ends with Normalize; update gppf.transfer.predict")
    steps[-1] = v2.Normalize(mean=list(spec.mean), std=list(spec.std))
    return v2.Compose(steps)


def _frame_targets(extent_x0y0x1y1: Sequence[float], *, orig_hw: tuple[int, int], input_hw: tuple[int, int],
                   image_id: int) -> dict[str, Any]:
    """Targets the heads read to map input pixels back to the original image (module docstring)."""
    x0, y0, x1, y1 = (float(v) for v in extent_x0y0x1y1)
    sx, sy = orig_hw[1] / max(x1 - x0, 1e-6), orig_hw[0] / max(y1 - y0, 1e-6)
    crop_box = [-x0 * sx, -y0 * sy, (input_hw[1] - x0) * sx, (input_hw[0] - y0) * sy]
    return {"orig_size": torch.tensor(orig_hw), "image_id": image_id, "scale": torch.tensor([sx, sy]),
            "crop_box": torch.tensor(crop_box), "extent": torch.tensor([x0, y0, x1, y1])}


class ImageFiles(Dataset):
    """``files[i]`` decoded and preprocessed: ``(i, image [3, S, S], target, original uint8 or None)``, or
    ``(i, error message)`` when the file cannot be read (``keep_original``: keep the decoded image)."""

    def __init__(self, files: Sequence[Path], *, transform: Callable, keep_original: bool) -> None:
        self.files, self.transform, self.keep_original = list(files), transform, keep_original

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        try:
            image = load_rgb(self.files[i])
        except SampleError as exc:
            return (i, str(exc))
        orig_hw = (int(image.shape[-2]), int(image.shape[-1]))
        extent = tv_tensors.BoundingBoxes([[0, 0, orig_hw[1], orig_hw[0]]], format="XYXY", canvas_size=orig_hw)
        try:
            out, target = self.transform(image, {"extent": extent})
        except (RuntimeError, ValueError) as exc:  # e.g. an image too small for the pipeline
            return (i, f"cannot preprocess image {self.files[i]}: {exc}")
        input_hw = (int(out.shape[-2]), int(out.shape[-1]))
        box = target["extent"].as_subclass(Tensor).reshape(4).tolist()
        frame = _frame_targets(box, orig_hw=orig_hw, input_hw=input_hw, image_id=i)
        return (i, out.as_subclass(Tensor), frame, image.as_subclass(Tensor) if self.keep_original else None)


@dataclass
class Loaded:
    """One collated batch of readable images plus the files that failed: ``[(index, message)]``."""

    batch: Batch | None
    indices: list[int]
    originals: list[Tensor | None]
    failed: list[tuple[int, str]] = field(default_factory=list)


def collate_items(items: Sequence[tuple[Any, ...]]) -> Loaded:
    """Collate :class:`ImageFiles` items, separating the failures (a module function: picklable)."""
    good = [it for it in items if len(it) == 4]
    failed = [(it[0], it[1]) for it in items if len(it) == 2]
    batch = collate_batch([(it[1], it[2]) for it in good]) if good else None
    return Loaded(batch=batch, indices=[it[0] for it in good], originals=[it[3] for it in good], failed=failed)


def _segmentation_predict(head: nn.Module, outputs_BKHW: Tensor, batch: Batch) -> list[Tensor]:
    """Per image: the head's class ids ``[H0, W0]`` from the logits of the image's extent (padding cut),
    resized by the head to the original size (a size-only ``mask`` in the batch tells it the size)."""
    fy = outputs_BKHW.shape[-2] / batch.images.shape[-2]
    fx = outputs_BKHW.shape[-1] / batch.images.shape[-1]
    masks = []
    for i, target in enumerate(batch.targets):
        x0, y0, x1, y1 = target["extent"].tolist()
        logits = outputs_BKHW[i : i + 1, :, round(y0 * fy) : round(y1 * fy), round(x0 * fx) : round(x1 * fx)]
        h0, w0 = (int(v) for v in target["orig_size"])
        one = Batch(images=batch.images[i : i + 1], targets=[target],
                    stacked={"mask": torch.empty((1, h0, w0), dtype=torch.uint8)})
        masks.append(head.predict(logits, one)[0])
    return masks


@torch.no_grad()
def predict_batch(predictor: TaskPredictor, batch: Batch, *, amp: bool = False) -> Any:
    """The head's predictions for ``batch`` in original pixels: classification/multilabel ``[B, C]``
    (logits / probabilities), detection per-image dicts, segmentation per-image ``[H0, W0]`` class ids,
    keypoints ``{"keypoints" [B, K, 3], "scores" [B]}``, reid L2-normalised ``[B, E]``."""
    batch = batch.to(predictor.device)
    dtype = torch.bfloat16 if amp else None
    with torch.autocast(predictor.device.type, dtype=dtype, enabled=amp):
        outputs = predictor.forward(batch.images)
    outputs = _to_float(outputs)
    if predictor.spec.type == "segmentation":
        return _segmentation_predict(predictor.head, outputs, batch)
    return predictor.head.predict(outputs, batch)


def _to_float(outputs: Any) -> Any:
    if isinstance(outputs, Tensor):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    return outputs


def predict_images(
    predictor: TaskPredictor, files: Sequence[Path], *, batch_size: int = 16, num_workers: int = 0,
    keep_original: bool = False, amp: bool = False,
) -> Iterator[tuple[Loaded, Any]]:
    """Yield ``(loaded, predictions)`` per batch of ``files`` (``predictions`` None when all failed)."""
    if batch_size < 1:
        raise PredictError(f"batch size must be >= 1, got {batch_size}")
    dataset = ImageFiles(files, transform=preprocess_transform(predictor.spec), keep_original=keep_original)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_items)
    for loaded in loader:
        preds = predict_batch(predictor, loaded.batch, amp=amp) if loaded.batch is not None else None
        yield loaded, preds


@dataclass
class PredictSummary:
    """What a ``run_predict`` call did."""

    out: Path
    task: str
    type: str
    found: int
    predicted: int
    skipped: list[tuple[str, str]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "task": self.task, "type": self.type, "found": self.found,
                "predicted": self.predicted, "skipped": len(self.skipped),
                "skipped_files": [{"file": f, "reason": r} for f, r in self.skipped],
                "seconds": round(self.seconds, 3)}


def _progress(total: int, enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    return Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled, refresh_per_second=4)


def run_predict(
    source: Path | str, *, task: str, inputs: Sequence[Path | str], out: Path | str = "predictions",
    batch_size: int = 16, device: str = "cpu", score_threshold: float | None = None,
    num_workers: int = 0, amp: bool = False, progress: bool = True,
) -> PredictSummary:
    """Predict ``task`` on every image of ``inputs`` and write the results under ``out`` (see
    ``gppf.transfer.predict_output``); unreadable images are named on stderr and skipped."""
    from gppf.transfer.predict_output import PredictionWriter

    files = find_images(inputs)
    predictor = load_predictor(source, task=task, device=device)
    writer = PredictionWriter(Path(out), spec=predictor.spec, score_threshold=score_threshold)
    skipped: list[tuple[str, str]] = []
    start = time.perf_counter()
    with _progress(len(files), progress) as bar, writer:
        job = bar.add_task("predict", total=len(files))
        batches = predict_images(predictor, files, batch_size=batch_size, num_workers=num_workers,
                                 keep_original=writer.needs_original, amp=amp)
        for loaded, preds in batches:
            for index, message in loaded.failed:
                skipped.append((str(files[index]), message))
                bar.console.print(f"gppf predict: skipped {files[index]}: {message}", markup=False, highlight=False,
                                  soft_wrap=True)
            if preds is not None:
                writer.write_batch([files[i] for i in loaded.indices], loaded, preds)
            bar.advance(job, len(loaded.indices) + len(loaded.failed))
    summary = PredictSummary(out=Path(out), task=task, type=predictor.spec.type, found=len(files),
                             predicted=writer.count, skipped=skipped, seconds=time.perf_counter() - start)
    (Path(out) / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
    return summary


def print_summary(summary: PredictSummary) -> None:
    """The end-of-run summary on stdout."""
    rate = summary.predicted / max(summary.seconds, 1e-9)
    print(f"gppf predict: task '{summary.task}' ({summary.type}): {summary.found} images found, "
          f"{summary.predicted} predicted, {len(summary.skipped)} skipped, {summary.seconds:.1f} s "
          f"({rate:.1f} img/s)")
    for file, reason in summary.skipped:
        print(f"  skipped {file}: {reason}")
    print(f"results: {summary.out / 'predictions.jsonl'}")


def main_predict(args: Any) -> int:
    """``gppf predict`` (argparse namespace from ``gppf.cli``)."""
    from gppf.transfer.pretrained import PretrainedError

    try:
        summary = run_predict(
            args.source, task=args.task, inputs=args.images, out=args.out, batch_size=args.batch_size,
            device=args.device, score_threshold=args.score_threshold, num_workers=args.workers,
            amp=args.bf16, progress=not args.no_progress,
        )
    except (PredictError, PretrainedError) as exc:
        print(f"gppf predict: error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0
