"""Run report: ``write_report(run_dir)`` builds ``report/index.html`` with PNG plots (see ``build``)."""
from gppf.report.build import (
    PLOT_NAMES,
    RunData,
    ema,
    load_run,
    plot_affinity,
    plot_losses,
    plot_usage,
    plot_val_metrics,
    read_metrics,
    task_affinity,
    usage_matrix,
    val_series,
    write_report,
)

__all__ = [
    "PLOT_NAMES", "RunData", "ema", "load_run", "plot_affinity", "plot_losses", "plot_usage",
    "plot_val_metrics", "read_metrics", "task_affinity", "usage_matrix", "val_series", "write_report",
]
