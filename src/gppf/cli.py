"""The ``gppf`` command line: pretrain, finetune, eval, extract, export, bench, data, inspect."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from gppf.config import RunConfig, default_config_path, load_config

__all__ = ["build_parser", "default_config_path", "main", "parse_args", "set_process_defaults"]


def set_process_defaults() -> None:
    """Process settings of the ``gppf`` command, applied before torch loads; explicit user settings win.

    OpenMP threads that spin while waiting make every op 10-100x slower as soon as another process
    (a DataLoader worker, a second job) shares the cores: measured here, a BatchNorm of 0.5M elements
    took 23-48 ms with spinning threads under contention vs 0.3-1 ms passive.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _load(config: str | None, overrides: list[str]) -> RunConfig:
    from gppf.registry import TASK_TYPES  # names only: no task module is imported

    return load_config(config or default_config_path(), overrides, task_types=TASK_TYPES.names())


def cmd_pretrain(args: argparse.Namespace) -> int:
    from gppf.engine.trainer import can_resume, train

    if args.resume and args.resume != "auto":
        run_dir = Path(args.resume)
        config = args.config or str(run_dir / "config.yaml")
        cfg = _load(config, args.overrides)
    else:
        cfg = _load(args.config, args.overrides)
        run_dir = Path(args.out)
    resume = can_resume(cfg, run_dir) if args.resume == "auto" else bool(args.resume)
    metrics = train(cfg, run_dir=run_dir, resume=resume)
    _print_summary(metrics, run_dir)
    return 0


def _print_summary(metrics: dict[str, float], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validation metrics ({run_dir})")
    for col in ("metric", "value", "chance", "margin"):
        table.add_column(col)
    for key, value in metrics.items():
        if "/chance/" in key:
            continue
        task, name = key.split("/", 1)
        chance = metrics.get(f"{task}/chance/{name}")
        margin = "" if chance is None else f"{value - chance:+.4f}"
        table.add_row(key, f"{value:.4f}", "" if chance is None else f"{chance:.4f}", margin)
    Console().print(table)
    print(f"report: {run_dir / 'report' / 'index.html'}")


def cmd_eval(args: argparse.Namespace) -> int:
    from gppf.engine.trainer import build_run, evaluate

    run_dir = Path(args.run)
    cfg = _load(args.config or str(run_dir / "config.yaml"), args.overrides)
    run = build_run(cfg, run_dir=run_dir, resume=True)
    metrics = evaluate(run)
    print(json.dumps(metrics, indent=1) if args.json else "")
    if not args.json:
        _print_summary(metrics, run_dir)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from gppf.engine.trainer import build_run
    from gppf.transfer.extract import extract

    run_dir = Path(args.run)
    cfg = _load(str(run_dir / "config.yaml"), [])
    run = build_run(cfg, run_dir=run_dir, resume=True)
    dense = extract(run.model.backbone, args.task)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(out))
    print(f"wrote {type(dense).__name__} weights of task '{args.task}' to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from gppf.registry import BACKBONES, READERS, TASK_TYPES

    what = args.what
    registries = {"backbones": BACKBONES, "tasks": TASK_TYPES, "readers": READERS}
    if what in registries:
        print("\n".join(registries[what].names()))
    elif what == "config":
        from gppf.config import to_dict

        print(json.dumps(to_dict(_load(args.config, args.overrides)), indent=1))
    else:
        routes = Path(what) / "routes.json"
        if not routes.is_file():
            print(f"gppf inspect: '{what}' is not backbones|tasks|readers|config or a run directory", file=sys.stderr)
            return 2
        print(routes.read_text())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "routing":
        from gppf.bench.routing import main_routing

        return main_routing(args.rest)
    if args.which == "lego":
        from gppf.bench.lego import main_lego

        return main_lego(args.rest)
    if args.which == "dist":
        from gppf.bench.dist import main_dist

        return main_dist(args.rest)
    if args.which == "gpu":
        from gppf.bench.gpu import main_gpu

        return main_gpu(args.rest)
    from gppf.bench.simt import main_simt

    return main_simt(args.rest)


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "check":
        from gppf.data.check import main_check

        return main_check(args.config, args.overrides)
    from gppf.data.paste import main_paste

    return main_paste(args.rest)


def not_implemented(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"gppf {name}: not implemented yet (planned in the sparse-transfer work)", file=sys.stderr)
        return 2

    return run


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (default: the built-in recipe)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gppf", description="General perception pre-training with lego backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="SIMT multi-task pre-training (default: built-in recipe)")
    _add_config_args(p)
    p.add_argument("--out", default="runs/pretrain", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint; 'auto': "
                   "continue --out if it holds a checkpoint of this config, else start it (requeued jobs)")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("eval", help="evaluate a run's last checkpoint on every task's validation split")
    p.add_argument("run", help="run directory")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("extract", help="extract one task's route as a plain dense model (safetensors)")
    p.add_argument("run", help="run directory")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_extract)
    for name, text in (("finetune", "sparse transfer to a downstream task"), ("export", "export a dense model")):
        p = sub.add_parser(name, help=f"{text} (not implemented yet)")
        p.add_argument("args", nargs="*")
        p.set_defaults(func=not_implemented(name))
    p = sub.add_parser("bench", help="benchmarks printing JSON: lego | simt | routing | dist | gpu")
    p.add_argument("which", choices=["lego", "simt", "routing", "dist", "gpu"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (--json, --quick, ...)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("data", help="data tools: check <config> | paste ...")
    p.add_argument("action", choices=["check", "paste"])
    p.add_argument("config", nargs="?", help="config to check (check)")
    p.add_argument("overrides", nargs="*", default=[])
    p.set_defaults(func=cmd_data, rest=[])
    p = sub.add_parser("inspect", help="list backbones|tasks|readers, show config, or a run's routes")
    p.add_argument("what")
    _add_config_args(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides also follow options (``gppf eval RUN --json a.b=1``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["data", "paste"]:
        from gppf.data.paste import main_paste

        return main_paste(argv[2:])
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:  # clear one-line errors for user mistakes
        from gppf.config import ConfigError
        from gppf.data.base import DataError
        from gppf.registry import RegistryError

        known: tuple[type[BaseException], ...] = (ConfigError, DataError, RegistryError, FileNotFoundError)
        try:
            from gppf.engine.checkpoint import CheckpointError
            from gppf.engine.trainer import TrainError

            known += (TrainError, CheckpointError)
        except ImportError:
            pass
        if isinstance(exc, known):
            print(f"gppf {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
