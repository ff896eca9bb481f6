"""Prometheus metrics: changes recorded, checks and their verdicts, request latency and errors.

Under gunicorn, ``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker
imports this module, so each worker writes its figures to that folder and ``/metrics``
(``monitoring.py``) adds them up across workers.  Without it, the process's own registry is used.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy import event
from sqlalchemy.orm import Session

from .db import Writer

ALL = "all"
_PENDING = "prefs.metrics.pending"
events_log = logging.getLogger("prefs.events")

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


def count_check(topic: str, recipients: int, reasons: Tally[str | None]) -> None:
    """Count one check call: its recipients and its verdicts (``None`` means allowed)."""
    CHECK_CALLS.labels(topic).inc()
    CHECK_RECIPIENTS.labels(topic).inc(recipients)
    for reason, count in reasons.items():
        CHECK_VERDICTS.labels(topic, reason or "allowed").inc(count)


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
        if action == "unsubscribe":
            OPT_OUTS.labels(topic, source, reason or "unsubscribed").inc(count)
        elif action == "resubscribe":  # not a hard bounce lifted under a complaint that still holds
            RESUBSCRIBES.labels(topic, source).inc(count)
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
