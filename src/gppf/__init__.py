"""gppf: general perception pre-training via sparsely activated multi-task learning.

Importing gppf changes no environment and imports no torch: ``create_backbone`` / ``list_backbones``
load ``gppf.backbones`` and ``load_task_model`` loads ``gppf.transfer.task_model`` on first use.
Extension points (task types, readers, backbones) are in ``gppf.registry``.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_backbone", "list_backbones", "load_task_model", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("create_backbone", "list_backbones"):
        import gppf.backbones

        return getattr(gppf.backbones, name)
    if name == "load_task_model":
        from gppf.transfer.task_model import load_task_model

        return load_task_model
    raise AttributeError(f"module 'gppf' has no attribute {name!r}")
