"""A small typed client for Python mailers: check, suppressions, changes, events.

It uses only the standard library, so a mailer can vendor this one file.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict


class Result(TypedDict, total=False):
    """One recipient's verdict, links and headers, as the check returns it."""

    email: str
    allowed: bool
    reason: str | None
    unsubscribe_url: str | None
    preferences_url: str | None
    headers: dict[str, str] | None
    warnings: list[str]


class PrefsError(Exception):
    """The service answered with an error."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.fields = status, code, message, fields or {}


@dataclass
class Client:
    """Talk to a prefs service with one API key."""

    base_url: str
    key: str
    timeout: float = 30.0
    _opener: urllib.request.OpenerDirector = field(default_factory=urllib.request.build_opener, repr=False)

    def __post_init__(self) -> None:
        if urllib.parse.urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError("base_url must be an http(s) URL")

    def check(self, topic: str, recipients: Sequence[str], campaign: str | None = None) -> list[Result]:
        """Return one result per recipient, in order (batches of up to 10,000 per call)."""
        results: list[Result] = []
        for start in range(0, len(recipients), 10_000):
            body: dict[str, Any] = {"topic": topic, "recipients": list(recipients[start : start + 10_000])}
            if campaign:
                body["campaign"] = campaign
            results.extend(self._call("POST", "/check", body)["results"])
        return results

    def suppressions(self, topic: str | None = None, limit: int = 10_000) -> Iterator[dict[str, Any]]:
        """Yield every suppressed address for a topic (or all marketing), page by page."""
        cursor: str | None = None
        while True:
            params = {"limit": str(limit)}
            if topic:
                params["topic"] = topic
            if cursor:
                params["cursor"] = cursor
            page = self._call("GET", "/suppressions?" + urllib.parse.urlencode(params))
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def changes(self, after: str | None = None, limit: int = 10_000) -> tuple[list[dict[str, Any]], str]:
        """Return the changes after a cursor and the cursor to keep for next time."""
        params = {"limit": str(limit)}
        if after:
            params["after"] = after
        page = self._call("GET", "/changes?" + urllib.parse.urlencode(params))
        return page["items"], page["next_cursor"]

    def events(self, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Report unsubscribes, re-subscriptions, complaints and hard bounces (1,000 per call)."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(events), 1000):
            results.extend(
                self._call("POST", "/events", {"events": list(events[start : start + 1000])})["results"]
            )
        return results

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (the scheme is checked in __post_init__)
            self.base_url.rstrip("/") + "/api/v1" + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.key}", "Accept": "application/json"}
            | ({"Content-Type": "application/json"} if data is not None else {}),
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            try:
                error = json.load(err)["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": str(err.reason)}
            raise PrefsError(
                err.code, error.get("code", ""), error.get("message", ""), error.get("fields")
            ) from None
