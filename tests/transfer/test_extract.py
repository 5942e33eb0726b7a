"""Extracted dense models equal the routed forward."""
import pytest
import torch
import torchvision

import gppf
from gppf.transfer.extract import extract, resnet_dense_state


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial BN affine and running stats (zero-init residual would hide mistakes)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5
            if hasattr(m, "task_running_mean"):  # per-task statistics: different for every task
                t = m.task_running_mean.shape[0]
                m.task_running_mean.data = torch.randn(t, n, generator=g) * 0.1
                m.task_running_var.data = torch.rand(t, n, generator=g) + 0.5


@pytest.mark.parametrize(
    ("name", "legos", "active", "tv_builder"),
    [("gppf_r18", 4, 2, torchvision.models.resnet18), ("gppf_r50", 16, 4, torchvision.models.resnet50)],
)
def test_extracted_resnet_loads_into_torchvision_and_matches(name, legos, active, tv_builder):
    bb = gppf.create_backbone(name, tasks=["a", "b"], legos=legos, active=active)
    _randomize(bb)
    with torch.no_grad():
        bb.router.logits_TLN.normal_()  # tasks pick different legos
    routes = bb.router.routes()
    assert routes["a"] != routes["b"]
    bb.eval()
    x = torch.randn(2, 3, 96, 80)
    for task in ("a", "b"):
        tv = tv_builder()
        tv.fc = torch.nn.Identity()
        tv.load_state_dict(resnet_dense_state(bb, task), strict=True)
        tv.eval()
        with torch.no_grad():
            torch.testing.assert_close(tv(x), bb.forward_pooled(x, task), atol=1e-4, rtol=1e-4)


def test_extraction_of_non_standard_width_and_train_mode_forward_value():
    bb = gppf.create_backbone("gppf_r50", tasks=["a"], legos=6, active=2, width_mult=0.25)
    _randomize(bb)
    dense = extract(bb, "a")
    x = torch.randn(2, 3, 64, 64)
    bb.eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), bb.forward_pooled(x, "a"), atol=1e-4, rtol=1e-4)
    # in training mode after the search phase the straight-through gates are exactly 1: same output
    bb.train()
    bb.router.set_progress(25, 100)  # search over (steps 0-19), not yet frozen (step 30)
    assert not bb.router.searching and bb.router("a").gate_LK is not None
    dense.train()
    torch.testing.assert_close(dense(x), bb.forward_pooled(x, "a"), atol=1e-4, rtol=1e-4)


def test_extracted_vit_matches_routed_forward():
    bb = gppf.create_backbone("gppf_vit_tiny", tasks=["a", "b"], legos=6, active=3, depth=3,
                              image_size=64, patch_size=16)
    with torch.no_grad():
        bb.router.logits_TLN.normal_()
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    bb.eval()
    x = torch.randn(2, 3, 64, 64)
    for task in ("a", "b"):
        vit = extract(bb, task)
        assert isinstance(vit, torchvision.models.VisionTransformer)
        with torch.no_grad():
            torch.testing.assert_close(vit(x), bb.forward_pooled(x, task), atol=1e-4, rtol=1e-4)
