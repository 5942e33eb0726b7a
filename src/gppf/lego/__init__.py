"""Lego units and task routers."""
from gppf.lego.layers import LegoBatchNorm2d, LegoConv2d, LegoIndex, LegoLinear, lego_gather
from gppf.lego.optim import LegoSGD, mark_lego_param
from gppf.lego.router import Route, TaskRouter, gate_channels, lego_channels

__all__ = [
    "LegoBatchNorm2d", "LegoConv2d", "LegoIndex", "LegoLinear", "Route", "TaskRouter", "gate_channels",
    "lego_channels", "lego_gather", "LegoSGD", "mark_lego_param",
]
