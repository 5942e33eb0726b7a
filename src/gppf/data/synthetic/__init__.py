"""Built-in procedural multi-domain data (the ``synthetic`` reader); see ``docs/builtin-data.md``.

The reader ``build`` is registered as ``synthetic`` in ``gppf.registry.READERS``.
"""
from gppf.data.synthetic.creature import KEYPOINT_NAMES, KEYPOINT_SIGMAS
from gppf.data.synthetic.dataset import (
    DOMAIN_CHOICES, TASK_TYPES, SyntheticDataset, SyntheticSpec, build, parse_options,
)
from gppf.data.synthetic.domains import DOMAINS, Domain, Look
from gppf.data.synthetic.scenes import Scene
from gppf.data.synthetic.shapes import SHAPES, mask_box

__all__ = [
    "DOMAINS", "DOMAIN_CHOICES", "KEYPOINT_NAMES", "KEYPOINT_SIGMAS", "SHAPES", "TASK_TYPES", "Domain", "Look",
    "Scene", "SyntheticDataset", "SyntheticSpec", "build", "mask_box", "parse_options",
]
