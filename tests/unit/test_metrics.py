"""The metrics registry renders what Prometheus' own parser reads back, value for value."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dcl.metrics import Counter, Family, Histogram, Registry, gauge, process_families


def parse(registry: Registry) -> dict[str, tuple[str, list[Sample]]]:
    """Family name -> (type, samples), as a Prometheus scrape would read them."""
    text = registry.render().decode()
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def test_counters_and_gauges_read_back_with_their_labels_and_values() -> None:
    calls = Counter("dcl_test_calls_total", "Calls.", ("method", "code"))
    calls.inc(("/a", "OK"))
    calls.inc(("/a", "OK"))
    calls.inc(("/b", "INTERNAL"), 3)
    registry = Registry()
    registry.register(calls)
    registry.register(lambda: [gauge("dcl_test_term", "Term.", 7),
                               gauge("dcl_test_info", "Info.", 1, node="n-0")])
    families = parse(registry)
    kind, samples = families["dcl_test_calls"]  # the parser strips a counter's _total
    assert kind == "counter"
    assert {(s.labels["method"], s.labels["code"]): s.value for s in samples} == {
        ("/a", "OK"): 2.0, ("/b", "INTERNAL"): 3.0}
    assert families["dcl_test_term"][1][0].value == 7
    assert families["dcl_test_info"][1][0].labels == {"node": "n-0"}


def test_histogram_buckets_are_cumulative_and_a_bound_counts_in_its_own_bucket() -> None:
    latency = Histogram("dcl_test_seconds", "Latency.", ("method",), buckets=(0.001, 0.01, 1))
    child = latency.labels("/p")
    for value in (0.0005, 0.001, 0.002, 0.5, 7.0):
        child.observe(value)
    latency.labels("/never")  # created, never observed: no series
    registry = Registry()
    registry.register(latency)
    kind, samples = parse(registry)["dcl_test_seconds"]
    assert kind == "histogram"
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert buckets == {"0.001": 2, "0.01": 3, "1.0": 4, "+Inf": 5}
    by_name = {s.name: s for s in samples if not s.name.endswith("_bucket")}
    assert by_name["dcl_test_seconds_count"].value == 5
    assert by_name["dcl_test_seconds_sum"].value == pytest.approx(7.5035)
    assert by_name["dcl_test_seconds_count"].labels == {"method": "/p"}
    assert all(s.labels.get("method") == "/p" for s in samples)


def test_label_values_with_quotes_backslashes_and_newlines_survive_the_round_trip() -> None:
    awkward = 'a "quoted"\\path\nand a newline'
    registry = Registry()
    registry.register(lambda: [gauge("dcl_test_label", "Help with \\ and\nnewline.", 1,
                                     peer=awkward)])
    [sample] = parse(registry)["dcl_test_label"][1]
    assert sample.labels == {"peer": awkward}


def test_values_render_as_integers_floats_and_infinities() -> None:
    registry = Registry()
    registry.register(lambda: [gauge("dcl_test_a", "A.", 2**40), gauge("dcl_test_b", "B.", 0.25),
                               gauge("dcl_test_c", "C.", float("inf")),
                               gauge("dcl_test_d", "D.", float("-inf")),
                               gauge("dcl_test_e", "E.", float("nan"))])
    text = registry.render().decode()
    assert "dcl_test_a 1099511627776\n" in text
    assert "dcl_test_b 0.25\n" in text
    assert "dcl_test_c +Inf\n" in text
    assert "dcl_test_d -Inf\n" in text
    assert "dcl_test_e NaN\n" in text
    parsed = {name: samples[0].value for name, (_, samples) in parse(registry).items()}
    assert parsed["dcl_test_d"] == float("-inf") and parsed["dcl_test_e"] != parsed["dcl_test_e"]


@pytest.mark.parametrize("make", [
    lambda: Counter("dcl_no_suffix", "A counter must end in _total."),
    lambda: Counter("1bad_total", "Bad name."),
    lambda: Counter("dcl_ok_total", "Reserved label.", ("le",)),
    lambda: Histogram("dcl_h", "Unsorted buckets.", buckets=(1.0, 0.5)),
    lambda: Histogram("dcl_h", "Infinite bucket.", buckets=(1.0, float("inf"))),
])
def test_malformed_metric_definitions_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


def test_a_counter_never_goes_down_and_a_name_registers_once() -> None:
    counter = Counter("dcl_test_total", "T.")
    with pytest.raises(ValueError):
        counter.inc((), -1)
    registry = Registry()
    registry.register(counter)
    registry.register(lambda: [Family("dcl_test_total", "counter", "Again.", (), [])])
    with pytest.raises(ValueError, match="registered twice"):
        registry.render()


def test_process_metrics_describe_this_process() -> None:
    families = {f.name: f for f in process_families()}
    cpu = families["process_cpu_seconds_total"].samples[0][2]
    rss = families["process_resident_memory_bytes"].samples[0][2]
    fds = families["process_open_fds"].samples[0][2]
    assert cpu > 0
    assert 10 << 20 < rss < 4 << 30  # a Python process with pytest loaded
    with open(os.devnull) as extra:
        assert extra.fileno() >= 0
        more = {f.name: f for f in process_families()}["process_open_fds"].samples[0][2]
    assert more >= fds + 1  # other threads (none expected) could open more meanwhile
