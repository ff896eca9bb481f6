"""Prometheus metrics: changes recorded, checks and their verdicts, request latency and errors.

Under gunicorn, ``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker
imports this module, so each worker writes its figures to that folder and ``/metrics``
(``monitoring.py``) adds them up across workers.  Without it, the process's own registry is used.

A figure never costs an answer: when the metrics folder's disk has no room for it, it is
dropped, counted in ``prefs_metrics_dropped_total`` (whose room is taken when the worker
starts) and logged once (``metric_files.py`` says why this needs care).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter as Tally
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy import event
from sqlalchemy.orm import Session

from ..store import Writer
from . import metric_files

ALL = "all"
_PENDING = "prefs.metrics.pending"
events_log = logging.getLogger("prefs.events")
log = logging.getLogger(__name__)

metric_files.install()  # before the first figure opens a file

OPT_OUTS = Counter("prefs_opt_outs", "Opt-outs recorded", ["topic", "source", "reason"])
RESUBSCRIBES = Counter("prefs_resubscribes", "Re-subscriptions recorded", ["topic", "source"])
CHECK_CALLS = Counter("prefs_check_calls", "Calls to /api/v1/check", ["topic"])
CHECK_RECIPIENTS = Counter("prefs_check_recipients", "Recipients checked", ["topic"])
CHECK_VERDICTS = Counter("prefs_check_verdicts", "Verdicts given, by reason", ["topic", "reason"])
LATENCY = Histogram(
    "prefs_request_duration_seconds",
    "Time to answer a request, by route pattern",
    ["endpoint", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ERRORS = Counter("prefs_http_errors", "Responses with a 4xx or 5xx status", ["status"])


DROPPED: Counter | None = None
_logged = False


def prepare() -> None:
    """Take the room the count of dropped figures needs, once per process, after the fork.

    Unlabelled, its one figure is placed in its file at once, and counting a drop never
    needs more room. Not at import: gunicorn's master imports this module, and a figure
    made before the fork is made again in each worker when first used, on whatever disk
    is left by then. A folder already full leaves it unmade; the first drop is logged.
    """
    global DROPPED
    if DROPPED is None:
        with contextlib.suppress(OSError):
            DROPPED = Counter("prefs_metrics_dropped", "Metric updates dropped: no room for them on disk")


def _log_drop(err: OSError) -> None:
    global _logged
    if not _logged:
        _logged = True
        log.warning(
            "metrics dropped: no room for them in the metrics folder %s (%s); requests are answered as usual",
            os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
            err.strerror or type(err).__name__,
        )


def dropped(err: OSError) -> None:
    """Count a metric update the metrics folder had no room for, and log the first."""
    _log_drop(err)
    if DROPPED is not None:
        with contextlib.suppress(OSError):
            DROPPED.inc()


def count_check(topic: str, recipients: int, reasons: Tally[str | None]) -> None:
    """Count one check call: its recipients and its verdicts (``None`` means allowed)."""
    try:
        CHECK_CALLS.labels(topic).inc()
        CHECK_RECIPIENTS.labels(topic).inc(recipients)
        for reason, count in reasons.items():
            CHECK_VERDICTS.labels(topic, reason or "allowed").inc(count)
    except OSError as err:
        dropped(err)


def count_change(
    session: Writer,
    topic: str | None,
    action: str,
    reason: str | None,
    source: str,
    campaign: str | None = None,
    count: int = 1,
) -> None:
    """Note recorded changes; they are counted and logged once their transaction commits."""
    session.info.setdefault(_PENDING, []).append((topic or ALL, action, reason, source, campaign, count))


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    committed(session.info)


def committed(info: dict[str, Any]) -> None:
    """Count and log the changes noted in a transaction's ``info``, now that it is committed."""
    for topic, action, reason, source, campaign, count in info.pop(_PENDING, ()):
        try:
            if action == "unsubscribe":
                OPT_OUTS.labels(topic, source, reason or "unsubscribed").inc(count)
            elif action == "resubscribe":  # not a hard bounce lifted under a complaint that still holds
                RESUBSCRIBES.labels(topic, source).inc(count)
        except OSError as err:
            dropped(err)
        events_log.info(
            action,
            extra={
                "action": action,
                "topic": topic,
                "source": source,
                "reason": reason,
                "campaign": campaign,
                "count": count,
            },
        )


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)
