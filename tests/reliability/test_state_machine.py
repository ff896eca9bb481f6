"""A model of the whole public surface: Hypothesis drives the app, a small model says what is right.

Each sequence gets addresses of its own, so sequences share one app and one database.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from werkzeug.datastructures import MultiDict

from prefs.domain import ledger
from prefs.domain.tokens import Tokens
from prefs.extensions import db
from prefs.models import Event
from tests.factories import bearer, make_key, make_topic
from tests.reliability.figures import report

pytestmark = pytest.mark.reliability

RETIRED = "retired-signing-key-0123456789"  # still listed: its links work
CURRENT = "current-signing-key-0123456789"
REMOVED = "removed-signing-key-0123456789"  # no longer listed: its links are refused
TOPICS = ("news", "events")  # news is opt-out, events opt-in
SEQUENCES = 200
FORM = "application/x-www-form-urlencoded"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
_RANK = {"complained": 3, "bounced": 2}
_VERDICT = {"unsubscribed": "unsubscribed_all", "complained": "complained", "bounced": "bounced"}
# who may bring back someone who left for this reason; anyone, for a plain unsubscribe
_LIFTED_BY = {"complained": {"preferences"}, "bounced": {"api", "cli"}}


@dataclass
class Person:
    """What the model knows of one address: the ledger's rule, in a few dozen lines."""

    seq: int = 0
    writes: int = 0  # every write for the address, changed or not: what makes an undo stale
    erased: bool = False
    left: str | None = None
    left_seq: int = 0
    bounced: bool = False  # a hard bounce on file
    choices: dict[str, tuple[bool, int, str]] = field(default_factory=dict)

    def held(self, source: str) -> bool:
        """Tell whether a choice from ``source`` may not bring a topic back."""
        if self.left == "complained" and (source not in _LIFTED_BY["complained"] or self.bounced):
            return True
        return self.left == "bounced" and source not in _LIFTED_BY["bounced"]

    def verdict(self, topic: str) -> tuple[bool, str | None]:
        if self.erased:
            return False, "erased"
        choice = self.choices.get(topic)
        if self.left is not None and (
            choice is None or choice[1] <= self.left_seq or (choice[0] and self.held(choice[2]))
        ):
            return False, _VERDICT[self.left]
        if choice is not None:
            return (True, None) if choice[0] else (False, "unsubscribed")
        return (False, "not_subscribed") if topic == "events" else (True, None)

    def choose(self, topic: str, subscribed: bool, source: str) -> bool:
        self.seq += 1
        if subscribed and self.left is not None and self.held(source):
            return False
        choice = self.choices.get(topic)
        if subscribed:
            current = choice is not None and choice[0] and not (self.left and choice[1] <= self.left_seq)
            # an opt-out topic is received by default: only a refusal on file is a change
            if topic != "events" and self.left is None:
                current = choice is None or choice[0]
        else:
            current = choice is not None and not choice[0]
        if not current:
            self.choices[topic] = (subscribed, self.seq, source)
        return not current

    def leave_all(self, reason: str = "unsubscribed") -> bool:
        self.seq += 1
        if reason == "bounced":
            self.bounced = True
        chose_since = any(on and seq > self.left_seq for on, seq, _ in self.choices.values())
        if self.left is None or _RANK.get(self.left, 1) < _RANK.get(reason, 1) or chose_since:
            # the stronger reason stays
            if self.left is None or _RANK.get(self.left, 1) <= _RANK.get(reason, 1):
                self.left = reason
            self.left_seq = self.seq
            return True
        return False

    def rejoin_all(self, source: str) -> None:
        self.seq += 1
        if self.left is None:
            return
        lifts_bounce = (self.left == "bounced" or self.bounced) and source in _LIFTED_BY["bounced"]
        if self.left == "complained":  # never lifted whole: topic by topic, in the preference center
            self.bounced = self.bounced and not lifts_bounce
            return
        if self.left == "bounced" and not lifts_bounce:
            return
        self.left, self.left_seq = None, 0
        if lifts_bounce:
            self.bounced = False


def test_the_service_agrees_with_the_model(make_app):
    # the model drives one key hard; its rate limit is not what is being tested here
    app = make_app(SECRET_KEYS=[RETIRED, CURRENT], RATELIMIT_API_KEY="1000000 per minute")
    with app.app_context():
        session = db.session()
        for key in TOPICS:
            make_topic(session, key, opt_in=key == "events")
        key = bearer(make_key(session, "send", "read", "write", "admin"))
    client = app.test_client()
    signers = {"current": Tokens([CURRENT]), "retired": Tokens([RETIRED]), "removed": Tokens([REMOVED])}
    counter = itertools.count()
    figures = {"requests": 0, "server_errors": 0, "sequences": 0, "undone": 0, "stale": 0, "elsewhere": 0}

    class Surface(RuleBasedStateMachine):
        @initialize()
        def people(self):
            n = next(counter)
            figures["sequences"] += 1
            self.people = {f"p{n}-{who}@example.com": Person() for who in ("ann", "bob")}
            with app.app_context():
                self.ids = {a: ledger.ensure_subscriber(db.session(), a).public_id for a in self.people}
            self.last = None
            # each address's latest undo form: (link, fields, writes when it was given, the restore)
            self.forms: dict[str, tuple[str, dict[str, str], int, Callable[[], None]]] = {}

        def send(self, method, path, **kwargs):
            response = client.open(path, method=method, **kwargs)
            figures["requests"] += 1
            if response.status_code >= 500:
                figures["server_errors"] += 1
            assert response.status_code < 500, (method, path, response.status_code)
            return response

        def write(self, method, path, expect, touch=None, **kwargs):
            """Send a write; ``touch`` counts, in the model, a write that reaches the ledger."""
            response = self.send(method, path, **kwargs)
            self.last = (method, path, kwargs, response.status_code, response.get_data(), touch)
            assert response.status_code == expect, (path, response.status_code, response.get_data()[:300])
            if touch is not None:
                touch()
            return response

        def link(self, address, topic, signer="current"):
            return signers[signer].unsubscribe(self.ids[address], topic, "sm")

        addresses = st.sampled_from(("ann", "bob"))
        topics = st.sampled_from((*TOPICS, None))

        def who(self, name):
            return next(a for a in self.people if a.endswith(f"-{name}@example.com"))

        def touch(self, person, changes=True):
            """Return the model's count of one write for ``person``, if it reaches the ledger."""
            if person.erased or not changes:
                return None

            def count():
                person.writes += 1

            return count

        @rule(name=addresses, topic=topics, signer=st.sampled_from(("current", "retired")))
        def one_click(self, name, topic, signer):
            address = self.who(name)
            person = self.people[address]
            status = 400 if person.erased else 200
            self.write(
                "POST",
                f"/u/{self.link(address, topic, signer)}",
                status,
                self.touch(person),
                data=ONE_CLICK,
                content_type=FORM,
            )
            if not person.erased:
                person.choose(topic, False, "one-click") if topic else person.leave_all()

        @rule(name=addresses, topic=topics, scope=st.sampled_from(("link", "all")))
        def unsubscribe_page(self, name, topic, scope):
            address = self.who(name)
            person = self.people[address]
            link = self.link(address, topic)
            response = self.write(
                "POST", f"/u/{link}", 400 if person.erased else 200, self.touch(person), data={"scope": scope}
            )
            if person.erased:
                return
            target = None if scope == "all" else topic
            if target is None:
                was_left, before = person.left, (person.left, person.left_seq)
                changed = person.leave_all()
                # undone only back to receiving marketing
                offered = changed and was_left is None

                def restore(person=person, before=before):
                    person.left, person.left_seq = before
            else:
                receiving = person.verdict(target)[0]
                prior = person.choices.get(target)
                changed = person.choose(target, False, "page")
                offered = changed and receiving

                def restore(person=person, target=target, prior=prior):
                    if prior is None:
                        del person.choices[target]
                    else:
                        person.choices[target] = prior

            found = re.search(r'name="undo" value="([^"]+)"', response.get_data(as_text=True))
            assert (found is not None) == offered, (scope, topic, offered)
            if found:
                fields = {"action": "undo", "undo": found.group(1)}
                self.forms[address] = (link, fields, person.writes, restore)

        @precondition(lambda self: bool(getattr(self, "forms", None)))
        @rule(name=addresses, other=st.sampled_from((False, False, False, True)))
        def undo(self, name, other):
            """Post the address's latest undo form on its own link, or on another (refused)."""
            address = self.who(name)
            person = self.people[address]
            if address not in self.forms:
                return
            link, fields, writes, restore = self.forms[address]
            clicked = link
            if other:  # the same person's link of another mailing
                link = signers["current"].unsubscribe(self.ids[address], "events", "sm-again")
            fresh = writes == person.writes
            # an undo reverts only what its own link's click did: on any other link it is refused
            status = 400 if person.erased or link != clicked else 200 if fresh else 409
            before = self.snapshot()
            self.write("POST", f"/u/{link}", status, self.touch(person), data=fields)
            self.last = None  # replayed below: a second undo is refused, by design
            figures["undone" if status == 200 else "stale" if status == 409 else "elsewhere"] += 1
            if status != 200:
                assert self.snapshot() == before
                return
            restore()
            # replayed: the undo itself made the form stale
            after = self.snapshot()
            self.write("POST", f"/u/{link}", 409, self.touch(person), data=fields)
            self.last = None
            assert self.snapshot() == after

        @rule(name=addresses, wanted=st.sets(st.sampled_from(TOPICS)), leave=st.booleans())
        def preference_form(self, name, wanted, leave):
            address = self.who(name)
            person = self.people[address]
            token = signers["current"].preferences(self.ids[address])
            form = (
                [("action", "leave-all")] if leave else [("action", "save"), *(("topic", t) for t in wanted)]
            )
            changes = {t: t in wanted for t in TOPICS if (t in wanted) != person.verdict(t)[0]}

            def touch(person=person, wanted=wanted, leave=leave):
                # the form saves only what differs from what is sent now; nothing to save, no write
                if leave or any((t in wanted) != person.verdict(t)[0] for t in TOPICS):
                    person.writes += 1

            status = 400 if person.erased else 303
            self.write("POST", f"/p/{token}", status, None if person.erased else touch, data=MultiDict(form))
            if person.erased:
                return
            if leave:
                person.leave_all()
                return
            for topic, on in changes.items():
                person.choose(topic, on, "preferences")

        @rule(
            name=addresses,
            kind=st.sampled_from(("unsubscribe", "resubscribe", "complaint", "hard_bounce")),
            topic=topics,
        )
        def event(self, name, kind, topic):
            address = self.who(name)
            person = self.people[address]
            item = {"type": kind, "email": address}
            if topic and kind in ("unsubscribe", "resubscribe"):
                item["topic"] = topic
            response = self.write(
                "POST", "/api/v1/events", 200, self.touch(person), json={"events": [item]}, headers=key
            )
            result = response.json["results"][0]
            if person.erased:
                assert result["status"] == ("error" if kind == "resubscribe" else "accepted")
                return
            if kind == "complaint":
                person.leave_all("complained")
            elif kind == "hard_bounce":
                person.leave_all("bounced")
            elif topic is None:
                person.rejoin_all("api") if kind == "resubscribe" else person.leave_all()
            else:
                person.choose(topic, kind == "resubscribe", "api")

        @rule(name=addresses)
        def erase(self, name):
            address = self.who(name)
            person = self.people[address]
            # not kept for a replay: a second erasure rightly finds nobody (404)
            response = self.send("DELETE", f"/api/v1/subscribers/{address}", headers=key)
            assert response.status_code == (404 if person.erased else 204)
            person.erased = True
            self.last = None  # the link of an erased subscriber rightly stops working

        @rule(
            name=addresses, topic=topics, method=st.sampled_from(("GET", "HEAD")), page=st.sampled_from("up")
        )
        def look(self, name, topic, method, page):
            address = self.who(name)
            token = (
                self.link(address, topic)
                if page == "u"
                else signers["current"].preferences(self.ids[address])
            )
            before = self.snapshot()
            response = self.send(method, f"/{page}/{token}")
            assert response.status_code == (400 if self.people[address].erased else 200)
            assert self.snapshot() == before  # GET and HEAD change nothing

        @rule(name=addresses, topic=topics, data=st.data())
        def forged(self, name, topic, data):
            address = self.who(name)
            good = self.link(address, topic)
            position = data.draw(st.integers(0, len(good) - 1))
            char = data.draw(st.sampled_from("AbZ09-_."))
            forged = good[:position] + char + good[position + 1 :]
            removed = self.link(address, topic, "removed")
            before = self.snapshot()
            for token in {forged, removed} - {good}:
                response = self.send("POST", f"/u/{token}", data=ONE_CLICK, content_type=FORM)
                assert response.status_code == 400
            assert self.snapshot() == before

        @rule()
        def replay(self):
            if self.last is None:
                return
            method, path, kwargs, status, body, touch = self.last
            before = self.snapshot()
            response = self.send(method, path, **kwargs)
            assert response.status_code == status  # a replay answers as the first call did
            if kwargs.get("data") == ONE_CLICK:
                assert response.get_data() == body
            assert self.snapshot() == before
            if touch is not None:
                touch()  # written again, though nothing changed: an earlier undo form is stale

        def snapshot(self):
            with app.app_context():
                session = db.session()
                verdicts = {(a, t): tuple(self.verdict(session, a, t)) for a in self.people for t in TOPICS}
                events = session.query(Event).count()
                return verdicts, events

        @staticmethod
        def verdict(session, address, topic):
            found = ledger.verdict_for(session, address, topic)
            return found.allowed, found.reason

        @invariant()
        def verdicts_agree(self):
            if not hasattr(self, "people"):
                return
            check = client.post(
                "/api/v1/check", json={"topic": "news", "recipients": list(self.people)}, headers=key
            )
            assert check.status_code == 200
            with app.app_context():
                session = db.session()
                for address, person in self.people.items():
                    for topic in TOPICS:
                        assert self.verdict(session, address, topic) == person.verdict(topic), (
                            address,
                            topic,
                        )
            for result, person in zip(check.json["results"], self.people.values(), strict=True):
                assert (result["allowed"], result["reason"]) == person.verdict("news")

    run_state_machine_as_test(
        Surface,
        settings=settings(
            max_examples=SEQUENCES,
            stateful_step_count=8,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    report(
        f"state machine, {SEQUENCES} sequences",
        figures["requests"],
        figures["requests"],
        0,
        figures["server_errors"],
        f"state machine: {figures['sequences']} sequences, {figures['requests']} requests, "
        f"{figures['server_errors']} 5xx, {figures['undone']} undos honoured, {figures['stale']} refused"
        f" as stale and {figures['elsewhere']} on another link, every verdict as the model says",
    )
    assert figures["sequences"] >= SEQUENCES
    assert figures["undone"] >= 5 and figures["stale"] >= 1 and figures["elsewhere"] >= 1
    assert json.dumps(figures)
