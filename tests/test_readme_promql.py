"""README: the PromQL it gives for leaving /metrics scrapes out of edge_requests_total works.

The expression is taken from the README itself and evaluated by `promtool test rules` over
synthetic series: scrapes of /metrics must not count, API traffic must.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_expression() -> str:
    found = [
        expr
        for expr in re.findall(r"`([^`\n]+)`", README.read_text())
        if "edge_requests_total" in expr and 'route!="/metrics"' in expr
    ]
    assert found, "the README does not say how to exclude /metrics from edge_requests_total"
    return found[0]


def test_readme_promql_excludes_metrics_scrapes(tmp_path):
    expr = readme_expression()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    series = [
        # One scrape per second of /metrics, half a request per second of chat.
        ('edge_requests_total{route="/metrics",method="GET",status="200"}', "0+60x10"),
        ('edge_requests_total{route="/v1/chat/completions",method="POST",status="200"}', "0+30x10"),
    ]
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "10m",
                        "exp_samples": [{"labels": '{status="200"}', "value": 0.5}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
