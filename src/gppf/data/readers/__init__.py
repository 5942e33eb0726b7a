"""Dataset readers; each module's ``build`` is registered by name in ``gppf.registry.READERS``.

Formats: ``imagefolder``, ``coco``, ``yolo``, ``mask_png``, ``table``, ``idx`` (see docs/data-formats.md).
"""
from __future__ import annotations

from gppf.data.readers import coco, idx, imagefolder, mask_png, table, yolo
from gppf.data.readers.common import ReaderDataset, SampleError

__all__ = ["ReaderDataset", "SampleError", "coco", "idx", "imagefolder", "mask_png", "table", "yolo"]
