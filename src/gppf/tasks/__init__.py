"""Task types and built tasks.

Task types are registered in ``gppf.registry.TASK_TYPES`` (built-ins by import path, plugins through the
``gppf.task_types`` entry-point group) and imported on first lookup. See ``gppf.tasks.base`` for the
framework and ``docs/tasks.md`` for adding a task type.
"""
from __future__ import annotations

from gppf.tasks.base import (
    TASK_TYPES,
    Batch,
    Head,
    Metric,
    Task,
    TaskType,
    TransformedDataset,
    build_task,
    check_task_types,
    head_option_defaults,
    head_options,
    iter_targets,
)

__all__ = [
    "TASK_TYPES", "Batch", "Head", "Metric", "Task", "TaskType", "TransformedDataset", "build_task",
    "check_task_types", "head_option_defaults", "head_options", "iter_targets",
]
