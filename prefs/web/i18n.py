"""The pages' languages: which one a request gets, and catalogs compiled from their sources."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path

from babel import Locale
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from flask import request
from flask_babel import get_locale
from flask_babel import lazy_gettext as _l
from werkzeug.datastructures import LanguageAccept
from werkzeug.http import parse_accept_header

log = logging.getLogger(__name__)

LANGUAGES = ("en", "de", "fr", "es")
DEFAULT = "en"
CATALOGS = Path(__file__).resolve().parent.parent / "translations"

# the friendly words for the statuses a page can end in, whatever raised them
ERROR_TEXT = {
    400: (_l("This request is not valid"), _l("Please go back and try again.")),
    404: (_l("This page does not exist"), _l("Please check the address of the page.")),
    405: (_l("This request is not valid"), _l("Please go back and try again.")),
    413: (
        _l("That was too much to send"),
        _l("The form sent more data than we accept. Nothing was changed; please try again."),
    ),
    429: (
        _l("Please wait a little"),
        _l("There have been too many requests like this one. Please try again later."),
    ),
    500: (_l("Something went wrong"), _l("Something went wrong on our side. Nothing was changed.")),
    503: (
        _l("Please try again in a moment"),
        _l("The service is briefly unavailable. Nothing was changed; please try again."),
    ),
}


def chosen_language() -> str | None:
    """Return the language the page's own switch asked for (``?lang=de``), if any."""
    lang = request.args.get("lang")
    return lang if lang in LANGUAGES else None


@functools.lru_cache(maxsize=256)
def accepted_language(header: str | None) -> str:
    """Return the language an ``Accept-Language`` header prefers among ours, or the default."""
    # a few browsers' headers account for nearly every request: each is parsed once
    return parse_accept_header(header, LanguageAccept).best_match(LANGUAGES) or DEFAULT


def select_locale() -> str:
    """Pick the language: the switch's choice first, then the browser's ``Accept-Language``."""
    return chosen_language() or accepted_language(request.headers.get("Accept-Language"))


def current_language() -> str:
    """Return the code of the language this response is written in."""
    return str(get_locale() or DEFAULT)


def language_names() -> list[tuple[str, str]]:
    """Return each language's code and its own name for itself, for the switch."""
    return [(code, Locale.parse(code).get_display_name(code) or code) for code in LANGUAGES]


def error_text(status: int) -> tuple[str, str] | None:
    """Return the translated title and message for an error status, where one is written."""
    text = ERROR_TEXT.get(status)
    return (str(text[0]), str(text[1])) if text else None


def compile_catalogs(directory: Path = CATALOGS) -> list[Path]:
    """Compile every ``.po`` whose ``.mo`` is missing or older; return the files written.

    A fresh clone has only the sources (``.mo`` files are not committed), so the app
    compiles them when it starts.  Each file is written whole and renamed into place,
    so workers starting together never read half a catalog.
    """
    written = []
    for po in sorted(directory.glob("*/LC_MESSAGES/*.po")):
        mo = po.with_suffix(".mo")
        if mo.exists() and mo.stat().st_mtime >= po.stat().st_mtime:
            continue
        try:
            with po.open("rb") as source:
                catalog = read_po(source, locale=po.parent.parent.name)
            fd, tmp = tempfile.mkstemp(dir=po.parent, suffix=".mo.tmp")
            try:
                with os.fdopen(fd, "wb") as target:
                    write_mo(target, catalog)
                os.replace(tmp, mo)
            except OSError:
                os.unlink(tmp)  # a full disk leaves no half catalog behind
                raise
        except OSError as err:
            # a read-only install still serves pages, in English where a catalog is missing
            log.warning("could not compile %s: %s", po, err)
            continue
        written.append(mo)
    return written
