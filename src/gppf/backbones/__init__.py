"""Lego backbones and their registry (``create_backbone``, ``list_backbones``)."""
from gppf.backbones import lego_resnet, lego_vit  # noqa: F401  (registration)
from gppf.backbones.base import BACKBONES, Features, LegoBackbone, create_backbone, list_backbones

__all__ = ["BACKBONES", "Features", "LegoBackbone", "create_backbone", "list_backbones"]
