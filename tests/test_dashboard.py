"""dashboards/llm-edge-proxy.json: every query uses metrics and labels the app really exposes.

The exposed names come from a real scrape of the app (falcon.testing, single process), not
from a list kept by hand: a renamed metric in edge/observability/metrics.py fails here until
the dashboard follows it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.app import create_app
from edge.config import Config
from edge.cost import Price
from edge.routing.providers import MOCK, Provider, Providers, Routing, Target

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "llm-edge-proxy.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Labels Prometheus adds at scrape time, and the histogram bucket label.
TARGET_LABELS = {"job", "instance"}
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "Inf", "NaN",
}  # fmt: skip
# What the dashboard must cover (one panel or more each).
REQUIRED = {
    "edge_requests_total",
    "edge_request_duration_seconds_bucket",
    "edge_overhead_seconds_bucket",
    "edge_requests_in_flight",
    "edge_rate_limited_total",
    "edge_rate_limiter_failures_total",
    "edge_upstream_requests_total",
    "edge_upstream_errors_total",
    "edge_upstream_duration_seconds_bucket",
    "edge_stream_time_to_first_token_seconds_bucket",
    "edge_tokens_total",
    "edge_auth_failures_total",
    "edge_cache_lookups_total",
    "edge_cache_store_bytes",
    "edge_cache_saved_tokens_total",
    "edge_cost_usd_total",
    "edge_cache_saved_usd_total",
}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


def priced_mock() -> Providers:
    """The built-in mock with a price, so that the cost families exist."""
    provider = Provider(MOCK, "", kind=MOCK)
    target = Target(provider, None, 1, "mock/*", Price(1.0, 2.0))
    routing = Routing(fallback_enabled=False, max_retries=0, breakers_enabled=False)
    return Providers({MOCK: provider}, {"*": (target,)}, routing, False)


# ------------------------------------------------------------------ PromQL, minimally


def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery durations
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, aggregations,
    keywords, label names (in `{…}` or `by/without/on/ignoring (…)`) or numbers."""
    expr = _strip(expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        token = match.group()
        if token in KEYWORDS or expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names matched in its `{…}`) for every selector with matchers."""
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", _strip(expr)):
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2)))
        found.append((match.group(1), labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", _strip(expr)):
        labels.update(name.strip() for name in group.split(",") if name.strip())
    return labels


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (status) (rate(edge_requests_total{job=~"$job"}[$__rate_interval]))',
         {"edge_requests_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) / b", {"a_bucket", "b"}),
        ('(sum(rate(x_total{status=~"5.."}[1m])) or vector(0)) / clamp_min(y, 1e-9)',
         {"x_total", "y"}),
        ("sum(rate(x[5m])) by (kind) > bool 0 offset 1h", {"x"}),
        ('label_values(edge_build_info{job=~"$job"}, instance)', {"edge_build_info", "instance"}),
    ],
)  # fmt: skip
def test_metric_name_extraction(expr, names):
    assert metric_names(expr) == names


# ------------------------------------------------------------------ the dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


@pytest.fixture(scope="module")
def exposed() -> dict[str, tuple[str, set[str]]]:
    """{exposed metric name: (family type, label names)} from a scrape of the real app."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # one process: this registry
        config = Config.from_env({"AUTH_ENABLED": "false", "CACHE_BACKEND": "local"})
        app = create_app(config, providers=priced_mock())
        client = falcon.testing.TestClient(app)
        assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
        hit = client.simulate_post("/v1/chat/completions", json=CHAT)  # the cache's families
        # (and the USD it saved: the mock is priced here)
        assert hit.headers["x-cache"] == "hit"
        stream = client.simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert stream.status_code == 200
        assert client.simulate_get("/v1/nothing").status_code == 404
        # What needs an upstream, a key store or limiter contention, through the same
        # recording calls the middleware makes, so that every family has samples to show its
        # labels.
        metrics = app.runtime.metrics
        metrics.observe_upstream(200, 0.01, None)
        metrics.observe_upstream(None, 0.01, "timeout")
        metrics.auth_failure("invalid")
        metrics.limiter_failure("lock_timeout", "allow")
        metrics.rate_limited.inc()
        metrics.provider_attempt("default", "2xx", 0.01)
        metrics.provider_event("retries", "default")
        metrics.provider_event("failovers", "default")
        metrics.provider_event("panics", "default")
        metrics.breaker_state.labels("default").set(0)
        metrics.observe_cost(None, 0.01)  # the mock's own answers are never billed
        result = client.simulate_get("/metrics")
    assert result.status_code == 200
    families = list(text_string_to_metric_families(result.text))
    names: dict[str, tuple[str, set[str]]] = {}
    for family in families:
        labels = {key for sample in family.samples for key in sample.labels} - {"le"}
        assert family.samples, f"{family.name} has no samples to learn its labels from"
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = (family.type, labels)
    # Sanity: the scrape's own sample names are all among them (_created is single-process
    # only: gunicorn's multiprocess collector does not expose it, so dashboards must not use it).
    samples = {s.name for f in families for s in f.samples if not s.name.endswith("_created")}
    assert samples <= set(names), samples - set(names)
    return names


def test_dashboard_basics(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]


def test_every_panel_has_a_title_a_datasource_and_queries(dashboard):
    panels = [panel for panel in all_panels(dashboard) if panel["type"] != "row"]
    assert len(panels) >= 12
    titles = [panel.get("title", "").strip() for panel in panels]
    assert all(titles), titles
    assert len(set(titles)) == len(titles)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_queries_use_only_exposed_metrics_and_labels(dashboard, exposed):
    used = set()
    variable_queries = [
        (f"variable {var['name']}", var["definition"])
        for var in dashboard["templating"]["list"]
        if var["type"] == "query"
    ]
    for where, expr in queries(dashboard) + variable_queries:
        if where.startswith("variable"):
            # label_values(metric{…}, label): the last argument is a label, not a metric.
            label = expr.rstrip(") ").rsplit(",", 1)[1].strip()
            names = metric_names(expr) - {label}
        else:
            names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - set(exposed)
        assert not unknown, f"{where} uses {sorted(unknown)}, not exposed by the app"
        used |= names
        known_labels = TARGET_LABELS | {"le"}
        for name in names:
            known_labels |= exposed[name][1]
        for metric, labels in selectors(expr):
            assert labels <= TARGET_LABELS | exposed[metric][1], (where, metric, labels)
        assert grouping_labels(expr) <= known_labels, (where, grouping_labels(expr))
    assert used >= REQUIRED, f"not on the dashboard: {sorted(REQUIRED - used)}"


def test_queries_are_valid_promql(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    values = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

    def concrete(expr: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ".*"), expr)

    rules = [
        {"record": f"dashboard:query_{index}", "expr": concrete(expr)}
        for index, (_, expr) in enumerate(queries(dashboard))
    ]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
