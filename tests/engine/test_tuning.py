"""Depths for layer-wise LR decay: stem 0, stages / blocks 1..D in order, parts after them D."""
from __future__ import annotations

from gppf.backbones import create_backbone
from gppf.engine.tuning import backbone_depths


def test_resnet_depths():
    depths, top = backbone_depths(create_backbone("gppf_r18", tasks=["a"], legos=4, active=2, width_mult=0.125))
    assert top == 4
    assert depths["conv1.weight"] == depths["bn1.bias"] == 0
    assert depths["layer1.0.conv1.weight"] == 1 and depths["layer4.1.bn2.weight"] == 4
    assert not any(name.startswith("router.") for name in depths)


def test_vit_depths():
    vit = create_backbone("gppf_vit_tiny", tasks=["a"], legos=3, active=3, depth=3, image_size=32, patch_size=8)
    depths, top = backbone_depths(vit)
    assert top == 3
    assert depths["conv_proj.weight"] == depths["class_token"] == depths["pos_embedding"] == 0
    assert depths["layers.0.ln_1.weight"] == 1 and depths["layers.2.mlp.fc2.weight"] == 3
    assert depths["ln.weight"] == 3 and all(d == 3 for n, d in depths.items() if n.startswith("fpn."))
