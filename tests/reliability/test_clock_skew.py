"""Clock skew between hosts: a link minted on a host whose clock runs ahead works at once.

With ``PREFS_TOKEN_MAX_AGE`` set, links are minted here on a clock of the test's own
(ahead of the service's by 2 s, 299 s, and too far: 310 s) and posted to real gunicorn
workers, whose clock is the machine's.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, select

from prefs.domain.tokens import Tokens
from prefs.models import Preference, Subscriber
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Service, seed, timed

pytestmark = pytest.mark.reliability

EACH = 20
AHEAD = {2: True, 299: True, 310: False}  # seconds ahead: accepted?


def opted_out(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(
                conn.scalars(
                    select(Subscriber.public_id)
                    .join(Preference, Preference.subscriber_id == Subscriber.id)
                    .where(Preference.subscribed.is_(False))
                )
            )
    finally:
        engine.dispose()


def test_links_minted_on_a_clock_ahead_work_up_to_five_minutes(service_database, tmp_path):
    count = EACH * len(AHEAD)
    _, seeded = seed(service_database, tmp_path / "instance", (f"skew{i}@example.com" for i in range(count)))
    service = Service(service_database, tmp_path, PREFS_TOKEN_MAX_AGE="3600").start()
    results: dict[int, list[tuple[str, int | None, int | None]]] = {ahead: [] for ahead in AHEAD}
    try:
        ids = iter(seeded.public_ids)
        for ahead in AHEAD:
            # minted just before each request: the service reads its clock a moment later
            minter = Tokens(TEST_KEYS, clock=lambda ahead=ahead: time.time() + ahead)
            for _ in range(EACH):
                public_id = next(ids)
                page = timed(service.base, "GET", f"/u/{minter.unsubscribe(public_id, 'news', 'skew')}")
                link = minter.unsubscribe(public_id, "news", "skew")
                one_click = timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM)
                results[ahead].append((public_id, page.status, one_click.status))
    finally:
        service.stop()
    out = opted_out(service_database)
    wrong = {
        ahead: [r for r in rows if (r[1:] == (200, 200)) != AHEAD[ahead] or (r[0] in out) != AHEAD[ahead]]
        for ahead, rows in results.items()
    }
    acked = [r for rows in results.values() for r in rows if r[2] == 200]
    server_errors = [r for rows in results.values() for r in rows if (r[1] or 0) >= 500 or (r[2] or 0) >= 500]
    lost = [r for r in acked if r[0] not in out]
    report(
        "links minted on a clock ahead",
        count,
        len(acked),
        len(lost),
        len(server_errors),
        "clock skew: "
        + ", ".join(
            f"{ahead} s ahead {sum(r[2] == 200 for r in results[ahead])}/{EACH} accepted" for ahead in AHEAD
        ),
    )
    assert not lost and not server_errors
    assert wrong == {ahead: [] for ahead in AHEAD}
    # too far ahead: the friendly page, nothing recorded
    assert {r[1:] for r in results[310]} == {(400, 400)}
