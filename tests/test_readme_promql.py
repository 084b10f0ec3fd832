"""README: the PromQL it gives works: leaving /metrics scrapes out of edge_requests_total, and
spend, cache savings and tokens per key.

The expressions are taken from the README itself and evaluated by `promtool test rules` over
synthetic series: scrapes of /metrics must not count, API traffic must; a key's figures are the
sum of its series on every host and model.
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


# ------------------------------------------------------------------ spend and tokens per key


def readme_expressions(metric: str) -> list[str]:
    """The README's PromQL over `metric` that sums it per key."""
    return [
        expr
        for expr in re.findall(r"`([^`\n]+)`", README.read_text())
        if metric in expr and "sum by (key" in expr
    ]


def promtool_test(tmp_path: Path, series: list[tuple[str, str]], tests: list[dict]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    spec = {
        "rule_files": [],
        "evaluation_interval": "1h",
        "tests": [
            {
                "interval": "1h",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(json.dumps(spec))
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


# 31 days of hourly samples. Every key has series on two hosts and (tokens) two models: the
# README's sums must add them up per key, whatever else the series carry.
HOURS = "x744"


@pytest.mark.parametrize("metric", ["edge_cost_usd_total", "edge_cache_saved_usd_total"])
def test_readme_promql_gives_usd_per_key_over_30_days(tmp_path, metric):
    found = readme_expressions(metric)
    assert found, f"the README gives no per-key PromQL over {metric}"
    series = [
        (f'{metric}{{instance="a:8000",key="team-a"}}', f"0+0.25{HOURS}"),
        (f'{metric}{{instance="b:8000",key="team-a"}}', f"0+0.5{HOURS}"),
        (f'{metric}{{instance="a:8000",key="key-0123456789ab"}}', f"0+0.125{HOURS}"),
        (f'{metric}{{instance="b:8000",key="none"}}', f"0+1{HOURS}"),
    ]
    expected = [
        {"labels": '{key="team-a"}', "value": 720 * 0.75},
        {"labels": '{key="key-0123456789ab"}', "value": 720 * 0.125},
        {"labels": '{key="none"}', "value": 720.0},
    ]
    tests = [{"expr": expr, "eval_time": "744h", "exp_samples": expected} for expr in found]
    promtool_test(tmp_path, series, tests)


def test_readme_promql_gives_tokens_per_key_and_kind_over_a_day(tmp_path):
    found = readme_expressions("edge_tokens_total")
    assert found, "the README gives no per-key PromQL over edge_tokens_total"
    series = []
    for instance in ("a:8000", "b:8000"):
        for model, per_hour in (("gpt-4o", 10), ("claude", 30)):
            for key in ("team-a", "key-0123456789ab"):
                for kind, factor in (("prompt", 1), ("completion", 2)):
                    labels = f'instance="{instance}",key="{key}",kind="{kind}",model="{model}"'
                    series.append((f"edge_tokens_total{{{labels}}}", f"0+{per_hour * factor}x48"))
    # Per key and kind: 24 hours of (10 + 30) tokens an hour, on 2 hosts, times the factor.
    expected = [
        {"labels": f'{{key="{key}",kind="{kind}"}}', "value": 24 * 40 * 2 * factor}
        for key in ("team-a", "key-0123456789ab")
        for kind, factor in (("prompt", 1), ("completion", 2))
    ]
    tests = [{"expr": expr, "eval_time": "48h", "exp_samples": expected} for expr in found]
    promtool_test(tmp_path, series, tests)
