"""Every registered backbone runs forward and backward at tiny size; only selected legos learn."""
import pytest
import torch

import gppf
from gppf.backbones import BACKBONES, Features
from gppf.lego.layers import LegoConv2d
from gppf.registry import RegistryError

TINY = {
    "gppf_r18": dict(legos=4, active=2, width_mult=0.25),
    "gppf_r50": dict(legos=4, active=2, width_mult=0.125),
    "gppf_vit_tiny": dict(legos=6, active=3, depth=2, image_size=64, patch_size=8),
    "gppf_vit_small": dict(legos=4, active=2, depth=1, image_size=32, patch_size=8, width_mult=0.25),
    "gppf_vit_base": dict(legos=8, active=4, depth=1, image_size=32, patch_size=8, width_mult=0.125),
}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_forward_backward_tiny(name):
    assert name in TINY, f"add a tiny setting for new backbone {name}"
    bb = gppf.create_backbone(name, tasks=["a", "b"], **TINY[name])
    x = torch.randn(2, 3, 64, 48)
    feats = bb(x, "a")
    assert isinstance(feats, Features)
    assert [p.shape[1] for p in feats.pyramid] == bb.feature_channels
    for p, s in zip(feats.pyramid, bb.feature_strides):
        assert abs(p.shape[-2] - 64 / s) < 1 and abs(p.shape[-1] - 48 / s) < 1
    assert feats.pooled.shape == (2, bb.pooled_dim)
    loss = sum(p.float().mean() for p in feats.pyramid) + feats.pooled.mean()
    loss.backward()
    assert bb.forward_pooled(x, "b").shape == (2, bb.pooled_dim)


@pytest.mark.parametrize("searching", [True, False], ids=["soft_topk_search", "topk_straight_through"])
@pytest.mark.parametrize("name", BACKBONES.names())
def test_task_loss_gives_router_logits_gradient_after_one_step(name, searching):
    """A real task loss (cross-entropy through a linear head) must reach task a's logits, and only a's.

    One SGD step first: zero-initialised residual branches (ResNets) block every gradient inside the
    branch at initialisation; after one step the branch is open and the router must learn.
    """
    torch.manual_seed(0)
    bb = gppf.create_backbone(name, tasks=["a", "b"], **TINY[name]).train()
    bb.router.set_progress(0 if searching else 25, 100)  # search: steps 0-19; frozen from step 30
    assert bb.router.searching == searching and not bb.router.frozen
    head = torch.nn.Linear(bb.pooled_dim, 3)
    opt = torch.optim.SGD([*bb.parameters(), *head.parameters()], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(bb.forward_pooled(x, "a")), y).backward()
        if _ == 0:
            opt.step()
    grad = bb.router.logits_TLN.grad
    assert grad[1].abs().sum() == 0  # task b did not run
    rms_L = grad[0].pow(2).mean(-1).sqrt()  # rescaled to unit RMS wherever the loss reaches the logits
    assert torch.allclose(rms_L, torch.ones_like(rms_L), atol=1e-4), rms_L


def test_unknown_backbone_and_duplicate_registration():
    with pytest.raises(RegistryError, match="did you mean 'gppf_r50'"):
        gppf.create_backbone("gppf_r5O")
    with pytest.raises(RegistryError, match="already registered"):
        BACKBONES.add("gppf_r18", lambda **kw: None)


@pytest.mark.parametrize("name", ["gppf_r18", "gppf_r50", "gppf_vit_tiny"])
def test_only_selected_legos_receive_gradient(name):
    bb = gppf.create_backbone(name, tasks=["a", "b"], **TINY[name])
    bb.router.fix_route("a", [[0, 1] if bb.active == 2 else [0, 1, 2]] * bb.router.num_layers)
    pooled = bb(torch.randn(2, 3, 64, 64), "a").pooled
    (pooled * torch.randn_like(pooled)).sum().backward()  # (a plain sum of a LayerNorm output has zero gradient)
    checked = 0
    for mod in bb.modules():
        w = getattr(mod, "lego_width", None)
        if w is None or not hasattr(mod, "legos"):
            continue
        for conv in [m for m in mod.children() if isinstance(m, LegoConv2d)]:
            g = conv.weight.grad
            out_routed = conv.out_channels == mod.legos * w
            if out_routed:
                assert g[bb.active * w:].abs().sum() == 0
                checked += 1
    if name.startswith("gppf_vit"):
        blk = bb.layers[0]
        w = blk.mlp.lego_width
        assert blk.mlp.fc1.weight.grad[3 * w:].abs().sum() == 0
        assert blk.mlp.fc1.weight.grad[: 3 * w].abs().sum() > 0
        wa = blk.self_attention.lego_width
        assert blk.self_attention.out_proj.weight.grad[:, 3 * wa:].abs().sum() == 0
        checked += 1
    assert checked > 0


def test_each_task_keeps_its_own_batchnorm_statistics():
    bb = gppf.create_backbone("gppf_r18", tasks=["bright", "dark"], legos=2, active=2, width_mult=0.25)
    bb.train()
    for _ in range(30):
        bb(torch.randn(4, 3, 32, 32) * 0.1 + 3.0, "bright")
        bb(torch.randn(4, 3, 32, 32) * 0.1 - 3.0, "dark")
    stem = bb.bn1
    assert stem.task_running_mean.shape == (2, stem.num_features)
    # the stem BN saw inputs of opposite sign: the two tasks' statistics must differ clearly
    assert (stem.task_running_mean[0] - stem.task_running_mean[1]).abs().max() > 0.1
    bb.eval()
    x = torch.randn(2, 3, 32, 32) * 0.1 + 3.0
    with torch.no_grad():
        own = bb.forward_pooled(x, "bright")
    before = stem.task_running_mean.clone()
    with torch.no_grad():
        bb.forward_pooled(x, "dark")  # eval forwards never change stored statistics
    assert torch.equal(before, stem.task_running_mean)
    assert torch.isfinite(own).all()


def test_add_task_copies_statistics():
    bb = gppf.create_backbone("gppf_r18", tasks=["a"], legos=2, active=2, width_mult=0.25)
    bb(torch.randn(4, 3, 32, 32) + 2.0, "a")
    bb.add_task("b", init_from="a")
    assert torch.equal(bb.bn1.task_running_mean[1], bb.bn1.task_running_mean[0])
    assert bb.router.tasks == ["a", "b"]


@pytest.mark.parametrize("name", ["gppf_r18", "gppf_vit_tiny"])
def test_one_template_forward_features_pyramid_pool(name):
    """ResNet and ViT share ``forward``: trunk = forward_features, then pyramid(trunk) and pool(trunk)."""
    bb = gppf.create_backbone(name, tasks=["a", "b"], **TINY[name]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = bb(x, "b")
        trunk = bb.forward_features(x, "b")
        pyramid, pooled = bb.pyramid(trunk), bb.pool(trunk)
        only_pooled = bb.forward_pooled(x, "b")
    assert len(pyramid) == len(feats.pyramid) == 4
    for mine, ref in zip(pyramid, feats.pyramid):
        torch.testing.assert_close(mine, ref)
    torch.testing.assert_close(pooled, feats.pooled)
    torch.testing.assert_close(only_pooled, feats.pooled)
    if name == "gppf_vit_tiny":  # the ViT pools its class token, not the pyramid
        torch.testing.assert_close(pooled, trunk.tokens_BSD[:, 0])
    else:  # the ResNet averages its last stage
        torch.testing.assert_close(pooled, trunk[-1].mean(dim=(2, 3)))
