"""gppf: general perception pre-training via sparsely activated multi-task learning."""
from gppf.backbones import create_backbone, list_backbones

__version__ = "0.1.0"
__all__ = ["create_backbone", "list_backbones", "__version__"]
