"""A hostile client cannot add series to the metrics: every label takes its value from a fixed set.

Each label value a worker has seen is a line in ``/metrics`` and an entry in the worker's
metrics file, for as long as the service runs. A label read from the request (its method,
its path) would let any client grow both without bound.
"""

from __future__ import annotations

import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.figures import report
from tests.reliability.harness import Service, request, seed, timed

pytestmark = pytest.mark.reliability

INVENTED = 200  # requests, each with a method and a path of its own
CLIENTS = 4


def series(base: str) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Return each metric's label sets as ``/metrics`` shows them."""
    status, _, body = request(base, "GET", "/metrics")
    assert status == 200, body[:200]
    found: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            # a histogram's buckets are one series
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            found.setdefault(family.name, set()).add(labels)
    return found


def method(n: int) -> str:
    """Return the ``n``-th invented method: an HTTP token no server knows."""
    letters = string.ascii_uppercase
    return "X" + letters[n % 26] + letters[n // 26 % 26] + letters[n // 676 % 26] + str(n)


def test_invented_methods_and_paths_add_no_series(service_database, tmp_path: Path) -> None:
    seed(service_database, tmp_path / "instance", ["ann@example.com"])
    service = Service(service_database, tmp_path).start()
    try:
        for _ in range(3):  # every route a normal client uses, seen once
            request(service.base, "GET", "/healthz")
            request(service.base, "HEAD", "/healthz")
            request(service.base, "GET", "/no/such/page")
        before = series(service.base)
        with ThreadPoolExecutor(CLIENTS) as pool:
            outcomes = list(
                pool.map(lambda n: timed(service.base, method(n), f"/invented/{n}"), range(INVENTED))
            )
        after = series(service.base)
        log = service.log()
    finally:
        service.stop()
    answered = [o for o in outcomes if o.status is not None]
    server_errors = sum(1 for o in answered if o.status >= 500)
    grown = {name: len(after[name] - before.get(name, set())) for name in after}
    values = {value for sets in after.values() for labels in sets for _, value in labels}
    report(
        "invented methods and paths (metric labels)",
        INVENTED,
        0,
        0,
        server_errors,
        f"metric labels: {INVENTED} requests with invented methods and paths, {len(answered)} answered,"
        f" {server_errors} 5xx; new series: {sum(grown.values())}"
        f" ({', '.join(f'{n} {name}' for name, n in sorted(grown.items()) if n) or 'none'})",
    )
    assert len(answered) == INVENTED
    assert all(400 <= (o.status or 0) < 500 for o in answered), {o.status for o in answered}
    # a few new series (an "other" method, an error status), never one per method or path
    assert sum(grown.values()) <= 3, grown
    invented = {method(n) for n in range(INVENTED)}
    assert not values & invented, "a method is a label"
    assert not [value for value in values if "invented" in value], "a path is a label"
    assert "Traceback" not in log
