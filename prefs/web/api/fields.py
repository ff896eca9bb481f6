"""The API's own field types: the domain's patterns, storable text, times in UTC, recipient lists."""

from __future__ import annotations

import re
from datetime import UTC
from typing import Any

from marshmallow import ValidationError, fields, validate

from ...domain.text import UNSTORABLE, storable

MAX_RECIPIENTS = 10_000


class Pattern(validate.Regexp):
    """The domain's own pattern, matched as the domain matches it; the document shows it ECMA-anchored.

    The domain's patterns end in ``\\Z``: a ``$`` would let a final line feed through.
    """

    def __init__(self, domain: re.Pattern[str], error: str) -> None:
        super().__init__("^" + domain.pattern.removesuffix("\\Z") + "$", error=error)
        self.domain = domain

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or self.domain.match(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class Text(fields.String):
    """A string both databases can store: no NUL character, no lone surrogate."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not storable(text):
            raise ValidationError(f"The text {UNSTORABLE}.")
        return text


class UTCTime(fields.AwareDateTime):
    """A time with its offset, taken as UTC; one that leaves the years 1 to 9999 in UTC is refused."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(default_timezone=None, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise ValidationError("The time falls outside the years 1 to 9999 in UTC.") from None


class Recipients(fields.List):  # type: ignore[type-arg]
    """A list of 1 to 10,000 address strings, checked in one pass (no field object per item)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fields.String(), validate=validate.Length(1, MAX_RECIPIENTS), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ValidationError("Not a valid list.")
        bad = {i: ["Not a valid string."] for i, item in enumerate(value) if type(item) is not str}
        if bad:
            raise ValidationError(bad)
        return value
