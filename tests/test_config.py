"""Typed config loading, overrides and errors that name keys."""
import os
import subprocess
import sys

import pytest

from gppf.config import ConfigError, RunConfig, load_config, save_config


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_load_yaml_and_overrides(tmp_path):
    p = write(tmp_path, """
model: {backbone: gppf_r18, legos: 8, active: 2}
tasks:
  - {name: cifar10, type: classification, data: {format: imagefolder, root: ../shared/data/cifar10, train: train, val: test}, batch_size: 64, image_size: 32}
train: {steps: 10}
""")
    cfg = load_config(p, ["train.steps=100", "tasks.cifar10.batch_size=8", "tasks.0.data.val=val", "model.router.mode=gumbel"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps == 100 and cfg.tasks[0].batch_size == 8 and cfg.tasks[0].data.val == "val"
    assert cfg.model.router.mode == "gumbel"


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("train: {stesp: 3}\n", [], r"unknown config key 'train.stesp'; did you mean 'train.steps'"),
        ("modle: {}\n", [], r"unknown config key 'modle'; did you mean 'model'"),
        ("tasks: [{name: a, tpye: classification}]\n", [], r"'tasks.0.tpye'; did you mean 'tasks.0.type'"),
        ("", ["train.step=3"], r"'train.step'; did you mean 'train.steps'"),
        ("train: {steps: many}\n", [], r"train.steps: expected an integer"),
        ("tasks: [{name: a}, {name: a}]\n", [], r"duplicate task name 'a'"),
        ("model: {legos: 4, active: 5}\n", [], r"model.active must be in"),
        ("", ["dist.sync_sparse_below=1.5"], r"dist.sync_sparse_below must be in \[0, 1\], got 1.5"),
        ("", ["tasks.nope.batch_size=3"], r"list"),
        ("train: {steps: 3\n", [], r"malformed YAML in .*cfg.yaml:\d+"),
        ("- 1\n- 2\n", [], r"top level must be a mapping"),
        ("", ["train.steps"], r"must look like key=value"),
    ],
)
def test_bad_config_errors_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_save_roundtrip(tmp_path):
    cfg = load_config(write(tmp_path, "tasks: [{name: a, route: [[0, 1], [2, 3]]}]\n"), ["train.lr=0.1"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg


def test_unknown_task_type_named_with_closest(tmp_path):
    """Config knows no task types itself; given the registered names (as the CLI passes them) or at build
    time (``check_task_types``), an unknown type names ``tasks.<i>.type`` and the closest valid one."""
    from gppf.registry import TASK_TYPES
    from gppf.tasks import check_task_types

    path = write(tmp_path, "tasks: [{name: a}, {name: b, type: clasification}]\n")
    cfg = load_config(path)  # the config alone cannot know plugin task types: no error yet
    message = r"tasks\.1\.type: unknown task type 'clasification'; did you mean 'classification'"
    with pytest.raises(ConfigError, match=message):
        check_task_types(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(path, task_types=TASK_TYPES.names())


def test_importing_gppf_and_config_is_light_and_pure():
    """``import gppf.config`` imports no other gppf module and no torch; ``import gppf`` sets no env var."""
    code = (
        "import os, sys; before = dict(os.environ); import gppf, gppf.config, gppf.registry; "
        "mods = sorted(m for m in sys.modules if m.startswith('gppf') or m == 'torch'); "
        "print(mods, os.environ == before)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "['gppf', 'gppf.config', 'gppf.registry'] True"
