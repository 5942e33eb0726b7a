"""Lego units and task routers."""
from gppf.lego.layers import LegoBatchNorm2d, LegoConv2d, LegoLinear
from gppf.lego.router import Route, TaskRouter, gate_channels, lego_channels

__all__ = ["LegoBatchNorm2d", "LegoConv2d", "LegoLinear", "Route", "TaskRouter", "gate_channels", "lego_channels"]
