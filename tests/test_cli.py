"""The gppf console script: every subcommand's --help works; listing and errors are clear."""
import subprocess
import sys

import pytest

from gppf.cli import build_parser, default_config_path, main

SUBCOMMANDS = ["pretrain", "finetune", "eval", "extract", "export", "bench", "data", "inspect", "route"]


def test_every_subcommand_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_works(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: gppf" in capsys.readouterr().out


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "gppf.cli", "inspect", "backbones"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert {"gppf_r18", "gppf_r50", "gppf_vit_tiny"} <= set(proc.stdout.split())


def test_inspect_lists_tasks_and_readers(capsys):
    assert main(["inspect", "tasks"]) == 0
    assert set(capsys.readouterr().out.split()) == {
        "classification", "multilabel", "detection", "segmentation", "keypoints", "reid"}
    assert main(["inspect", "readers"]) == 0
    assert {"imagefolder", "coco", "yolo", "mask_png", "table", "idx", "synthetic"} <= set(capsys.readouterr().out.split())


def test_default_recipe_is_packaged_and_valid(capsys):
    assert default_config_path().is_file()
    assert main(["inspect", "config", "train.steps=7"]) == 0
    assert '"steps": 7' in capsys.readouterr().out


def test_bad_override_is_a_one_line_error(capsys, tmp_path):
    assert main(["pretrain", "--out", str(tmp_path), "train.stesp=3"]) == 1
    err = capsys.readouterr().err
    assert "unknown config key 'train.stesp'; did you mean 'train.steps'" in err
    assert "Traceback" not in err


def test_finetune_without_its_arguments_says_what_it_needs(capsys):
    assert main(["finetune"]) == 1
    assert "needs --from RUN_DIR|none and --config FILE" in capsys.readouterr().err


def test_overrides_may_follow_options():
    from gppf.cli import parse_args

    args = parse_args(["eval", "runs/x", "--json", "train.steps=3"])
    assert args.json and args.overrides == ["train.steps=3"] and args.run == "runs/x"
