"""Lego units and task routers."""
from gppf.lego.layers import LegoBatchNorm2d, LegoConv2d, LegoIndex, LegoLinear, LegoRows, lego_gather, rows_used
from gppf.lego.optim import LegoSGD
from gppf.lego.router import Route, TaskRouter, gate_channels, lego_channels

__all__ = [
    "LegoBatchNorm2d", "LegoConv2d", "LegoIndex", "LegoLinear", "LegoRows", "Route", "TaskRouter", "gate_channels",
    "lego_channels", "lego_gather", "LegoSGD", "rows_used",
]
