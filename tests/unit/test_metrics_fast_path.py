"""The metrics hot path writes into prometheus_client's own mmap files, bypassing its lock.

edge.observability.metrics relies on prometheus_client internals (MmapedValue `_file`, `_key`,
`_value`; MmapedDict `_m`, `_positions`; Histogram `_sum`, `_buckets`, `_upper_bounds`). These
tests fail loudly when a prometheus_client release moves them, and check, through
prometheus_client's own readers (MmapedDict, MultiProcessCollector), that what the fast path
writes is exactly what the public API would have written.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

TESTED = ((0, 26), (0, 26))  # pyproject.toml pins prometheus_client to this range


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Multiprocess mode in this process: a fresh mmap value class writing to tmp_path."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    yield tmp_path
    values.close_all_multiprocess_files()


def scrape(metrics) -> dict[tuple[str, tuple], float]:
    text, _ = metrics.render()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_prometheus_client_version_is_the_tested_one():
    version = tuple(int(part) for part in metadata.version("prometheus_client").split(".")[:2])
    assert TESTED[0] <= version <= TESTED[1], (
        f"prometheus_client {version} is outside the range the metrics fast path was tested "
        f"with {TESTED}: rerun these tests and update pyproject.toml"
    )


def test_internals_the_fast_path_uses_are_there(multiprocess):
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    counter = Counter("c", "c", ["a"], registry=registry).labels("x")
    value = counter._value
    assert value._multiprocess is True
    assert isinstance(value._file, MmapedDict)
    assert isinstance(value._key, str)
    assert isinstance(value._value, float)
    assert value._key in value._file._positions
    assert len(value._file._m) >= value._file._positions[value._key] + 16
    histogram = Histogram("h", "h", buckets=(1, 2), registry=registry)
    assert list(histogram._upper_bounds) == [1.0, 2.0, float("inf")]
    assert len(histogram._buckets) == 3
    assert histogram._sum._multiprocess is True


def test_fast_writes_are_read_back_exactly_by_prometheus_client(multiprocess):
    from edge.observability.metrics import Metrics

    metrics = Metrics(multiprocess)
    route = "/v1/chat/completions"
    for _ in range(3):
        metrics.in_flight.inc()
        metrics.observe_request(route, "POST", 200, 0.02, 0.0003)
        metrics.observe_upstream(200, 0.0197, None)
        metrics.observe_tokens("m", 5, 7)
        metrics.observe_request_size(route, 300)
        metrics.ttft.observe(0.004)
        metrics.stream_duration.observe(3.0)
    metrics.in_flight.dec()
    metrics.observe_request(route, "POST", 429, 0.001, 0.001)
    metrics.rate_limited.inc()
    metrics.auth_failure("missing")
    metrics.observe_upstream(None, 1.0, "timeout")

    got = scrape(metrics)

    def r(le: str | None = None) -> tuple:
        return (("le", le), ("route", route)) if le else (("route", route),)

    requests = (("method", "POST"), ("route", route), ("status", "200"))
    assert got[("edge_requests_total", requests)] == 3
    requests = (("method", "POST"), ("route", route), ("status", "429"))
    assert got[("edge_requests_total", requests)] == 1
    assert got[("edge_request_duration_seconds_count", r())] == 4
    assert got[("edge_request_duration_seconds_sum", r())] == pytest.approx(0.061)
    # Buckets are cumulative: 0.001 <= 0.005; 0.02 <= 0.025.
    assert got[("edge_request_duration_seconds_bucket", r("0.005"))] == 1
    assert got[("edge_request_duration_seconds_bucket", r("0.01"))] == 1
    assert got[("edge_request_duration_seconds_bucket", r("0.025"))] == 4
    # A value equal to a bound falls in that bucket, as Histogram.observe puts it.
    assert got[("edge_overhead_seconds_bucket", r("0.00025"))] == 0
    assert got[("edge_overhead_seconds_bucket", r("0.0005"))] == 3
    assert got[("edge_overhead_seconds_bucket", r("0.001"))] == 4
    assert got[("edge_requests_in_flight", ())] == 2
    assert got[("edge_rate_limited_total", ())] == 1
    assert got[("edge_auth_failures_total", (("reason", "missing"),))] == 1
    assert got[("edge_upstream_requests_total", (("outcome", "2xx"),))] == 3
    assert got[("edge_upstream_requests_total", (("outcome", "error"),))] == 1
    assert got[("edge_upstream_errors_total", (("kind", "timeout"),))] == 1
    assert got[("edge_upstream_duration_seconds_count", ())] == 4
    tokens = (("key", "none"), ("kind", "prompt"), ("model", "m"))
    assert got[("edge_tokens_total", tokens)] == 15
    assert got[("edge_stream_time_to_first_token_seconds_count", ())] == 3
    assert got[("edge_stream_duration_seconds_bucket", (("le", "5.0"),))] == 3
    assert got[("edge_stream_duration_seconds_bucket", (("le", "2.5"),))] == 0
    assert got[("edge_request_size_bytes_sum", r())] == 900

    # The public API sees the same values (the fast path keeps MmapedValue._value current), and
    # a public increment after fast ones continues from them instead of overwriting them.
    metrics._rate_limited_family.inc()
    assert scrape(metrics)[("edge_rate_limited_total", ())] == 2

    # And each file reads back with prometheus_client's own MmapedDict (as the master does).
    reader = MmapedDict(str(multiprocess / f"counter_{os.getpid()}.db"), read_mode=True)
    try:
        counters = {key: value for key, value, _ in reader.read_all_values()}
    finally:
        reader.close()
    assert sum(v for k, v in counters.items() if '"edge_rate_limited_total"' in k) == 2


def test_a_forked_child_writes_to_its_own_files(multiprocess):
    from edge.observability.metrics import Metrics

    metrics = Metrics(multiprocess)
    metrics.rate_limited.inc()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            metrics.rate_limited.inc(5)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert status == 0
    assert (multiprocess / f"counter_{child}.db").exists()
    # The child's counts went to its own file, continuing from zero there, and the sum is exact.
    assert scrape(metrics)[("edge_rate_limited_total", ())] == 6
