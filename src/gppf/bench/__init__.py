"""Benchmarks printing JSON (``gppf bench lego``, ``gppf bench simt``); entry points load lazily.

Lazy so that ``python -m gppf.bench.lego`` does not import its own module twice and so that one
benchmark's imports do not weigh on another's.
"""
from __future__ import annotations

import importlib
from typing import Any

_ENTRY_POINTS: dict[str, str] = {
    "main_lego": "lego",
    "run_lego_bench": "lego",
    "main_simt": "simt",
    "run_simt_bench": "simt",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gppf.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gppf.bench.{module}"), name)
