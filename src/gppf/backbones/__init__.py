"""Lego backbones (``create_backbone``, ``list_backbones``); builders are registered in ``gppf.registry``."""
from gppf.backbones.base import BACKBONES, Features, LegoBackbone, create_backbone, list_backbones

__all__ = ["BACKBONES", "Features", "LegoBackbone", "create_backbone", "list_backbones"]
