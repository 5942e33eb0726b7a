"""Benchmarks printing JSON (``gppf bench ...``); entry points are imported lazily.

Lazy so that ``python -m gppf.bench.lego`` does not import its own module twice.
"""
from __future__ import annotations

from typing import Any

__all__ = ["main_lego", "run_lego_bench"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gppf.bench import lego

        return getattr(lego, name)
    raise AttributeError(f"module 'gppf.bench' has no attribute {name!r}")
