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
        ("tasks: [{name: a, type: clasification}]\n", [], r"did you mean 'classification'"),
        ("tasks: [{name: a}, {name: a}]\n", [], r"duplicate task name 'a'"),
        ("model: {legos: 4, active: 5}\n", [], r"model.active must be in"),
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
