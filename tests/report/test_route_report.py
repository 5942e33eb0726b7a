"""Route decisiveness section of the run report."""
from __future__ import annotations

import json


def test_routing_section_plots_churn_margins_and_usage_over_time(tmp_path):
    from gppf.report.routes import PLOTS, routing_section, usage_over_time

    routes = [{"a": [[0, 1], [0, 1]], "b": [[2, 3], [1, 2]]}, {"a": [[0, 1], [1, 2]], "b": [[2, 3], [1, 2]]}]
    recs = [{"kind": "router", "step": 0, "frozen": False, "margin/a": 0.01, "margin/b": 0.02, "routes": routes[0]},
            {"kind": "router", "step": 10, "frozen": False, "churn": 0.25, "margin/a": 0.5, "margin/b": 0.4,
             "routes": routes[1]},
            {"kind": "router", "step": 20, "frozen": True, "churn": 0.0, "margin/a": 1.0, "margin/b": 0.8,
             "routes": routes[1]}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    out = tmp_path / "report"
    out.mkdir()
    html_text = routing_section(tmp_path, out, num_legos=4)
    assert all((out / name).stat().st_size > 1000 for name in PLOTS)
    assert "routes last changed at step 10; frozen from step 20" in html_text
    assert "40x-100x" in html_text  # margins a: 0.01 -> 1.0, b: 0.02 -> 0.8
    assert usage_over_time(recs, "a", 4)[:, 1].tolist() == [0.5, 1.0, 0.5, 0.0]
    (tmp_path / "metrics.jsonl").write_text("")
    assert "no route records" in routing_section(tmp_path, out) and not (out / PLOTS[0]).exists()
