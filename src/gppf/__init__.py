"""gppf: general perception pre-training via sparsely activated multi-task learning."""
import os

# OpenMP threads that spin while waiting make every op 10-100x slower as soon as another process
# (a DataLoader worker, a second job) shares the cores: measured here, a BatchNorm of 0.5M elements
# took 23-48 ms with spinning threads under contention vs 0.3-1 ms passive. Must be set before torch
# loads; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gppf.backbones import create_backbone, list_backbones  # noqa: E402

__version__ = "0.1.0"
__all__ = ["create_backbone", "list_backbones", "__version__"]
