"""Task types and built tasks. Importing this package registers the built-in task types.

See ``gppf.tasks.base`` for the framework and ``docs/tasks.md`` for adding a task type.
"""
from __future__ import annotations

from gppf.tasks import classification, detection, keypoints, multilabel, reid, segmentation  # noqa: F401
from gppf.tasks.base import (
    TASK_TYPES,
    Batch,
    Metric,
    Task,
    TaskType,
    TransformedDataset,
    build_task,
    head_options,
    iter_targets,
)

__all__ = [
    "TASK_TYPES",
    "Batch",
    "Metric",
    "Task",
    "TaskType",
    "TransformedDataset",
    "build_task",
    "head_options",
    "iter_targets",
]
