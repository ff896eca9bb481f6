"""Languages: complete catalogs, compiled from source, chosen per request, with a switch."""

import os
import shutil
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from prefs.web import i18n
from tests.disks import fill, small_disk
from tests.factories import make_subscriber, make_topic, preferences_token, unsubscribe_token

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = {"_": None, "gettext": None, "_l": None, "lazy_gettext": None}
SOURCES = [
    ("templates", [("**.html", "jinja2.ext:babel_extract"), ("**.txt", "jinja2.ext:babel_extract")]),
    ("prefs", [("**.py", "python")]),
]
TRANSLATED = [lang for lang in i18n.LANGUAGES if lang != i18n.DEFAULT]


def source_messages():
    """Return every string the code and templates mark for translation."""
    found = set()
    for folder, method_map in SOURCES:
        for _file, _line, message, _comments, _context in extract_from_dir(
            ROOT / folder, method_map=method_map, keywords=KEYWORDS
        ):
            found.add(message)
    return found


def catalog(lang):
    with (i18n.CATALOGS / lang / "LC_MESSAGES" / "messages.po").open("rb") as f:
        return read_po(f, locale=lang)


@pytest.mark.parametrize("lang", TRANSLATED)
def test_every_string_is_translated_and_no_stale_ones_remain(lang):
    messages = source_messages()
    entries = {m.id: m for m in catalog(lang) if m.id}
    assert len(messages) > 50
    assert sorted(messages - set(entries)) == [], "missing from the catalog"
    assert sorted(set(entries) - messages) == [], "no longer in the source"
    assert [m.id for m in entries.values() if not m.string or m.fuzzy] == []


@pytest.mark.parametrize("lang", TRANSLATED)
def test_placeholders_match(lang):
    problems = [(message.id, errors) for message, errors in catalog(lang).check() if errors]
    assert problems == []


def test_catalogs_are_compiled_when_missing_or_stale(tmp_path):
    folder = tmp_path / "translations"
    shutil.copytree(i18n.CATALOGS, folder, ignore=shutil.ignore_patterns("*.mo"))
    written = i18n.compile_catalogs(folder)
    assert sorted(p.parent.parent.name for p in written) == sorted(TRANSLATED)
    assert i18n.compile_catalogs(folder) == []  # up to date: nothing to do
    po = folder / "de" / "LC_MESSAGES" / "messages.po"
    later = po.with_suffix(".mo").stat().st_mtime + 10
    os.utime(po, (later, later))
    assert i18n.compile_catalogs(folder) == [po.with_suffix(".mo")]
    assert list(folder.rglob("*.tmp")) == []


def test_a_read_only_install_still_starts(tmp_path, caplog, monkeypatch):
    folder = tmp_path / "translations"
    shutil.copytree(i18n.CATALOGS, folder, ignore=shutil.ignore_patterns("*.mo"))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(i18n.tempfile, "mkstemp", read_only)
    assert i18n.compile_catalogs(folder) == []
    assert "could not compile" in caplog.text


def test_a_full_disk_leaves_no_half_catalog_and_still_starts(tmp_path, caplog):
    with small_disk(tmp_path / "disk", size="64k") as disk:
        folder = disk / "translations"
        shutil.copytree(i18n.CATALOGS, folder, ignore=shutil.ignore_patterns("*.mo"))
        fill(disk)
        assert i18n.compile_catalogs(folder) == []
        assert "could not compile" in caplog.text
        assert list(folder.rglob("*.tmp")) == [] and list(folder.rglob("*.mo")) == []


def test_the_app_compiles_its_catalogs_at_start(make_app):
    for mo in i18n.CATALOGS.glob("*/LC_MESSAGES/*.mo"):
        mo.unlink()
    make_app()
    assert sorted(p.parent.parent.name for p in i18n.CATALOGS.glob("*/LC_MESSAGES/*.mo")) == sorted(
        TRANSLATED
    )


@pytest.mark.parametrize(
    ("header", "lang", "heading"),
    [
        ("de-DE,de;q=0.9,en;q=0.5", "de", "E-Mail-Einstellungen"),
        ("fr-CH, fr;q=0.9", "fr", "Préférences e-mail"),
        ("es-419", "es", "Preferencias de correo"),
        ("fr;q=0.5, es;q=0.9", "es", "Preferencias de correo"),
        ("ja, zh;q=0.8", "en", "Email preferences"),
        ("", "en", "Email preferences"),
    ],
)
def test_the_language_comes_from_accept_language(client, session, header, lang, heading):
    subscriber = make_subscriber(session)
    page = client.get(f"/p/{preferences_token(subscriber)}", headers={"Accept-Language": header})
    text = page.get_data(as_text=True)
    assert f'<html lang="{lang}">' in text and f"<h1>{heading}</h1>" in text


def test_the_switch_overrides_the_browser_and_is_carried_in_links_and_forms(client, session):
    make_topic(session, "news")
    subscriber = make_subscriber(session)
    token = unsubscribe_token(subscriber, "news")
    page = client.get(f"/u/{token}?lang=es", headers={"Accept-Language": "de"}).get_data(as_text=True)
    assert '<html lang="es">' in page and "Darse de baja" in page
    assert f'action="/u/{token}?lang=es"' in page
    assert "lang=es" in page.split('href="/p/', 1)[1].split('"', 1)[0]
    confirmation = client.post(f"/u/{token}?lang=es").get_data(as_text=True)
    assert '<html lang="es">' in confirmation
    assert "Set-Cookie" not in client.get(f"/u/{token}?lang=fr").headers


def test_an_unknown_language_in_the_switch_is_ignored(client):
    page = client.get("/unsubscribe?lang=xx", headers={"Accept-Language": "fr"}).get_data(as_text=True)
    assert '<html lang="fr">' in page


def test_the_switch_lists_every_language_in_its_own_name(client):
    page = client.get("/unsubscribe?lang=de").get_data(as_text=True)
    nav = page.split('<nav aria-label="Sprache">', 1)[1].split("</nav>", 1)[0]
    assert '<span aria-current="true" lang="de">Deutsch</span>' in nav
    for code, name in (("en", "English"), ("fr", "français"), ("es", "español")):
        assert f'<a href="/unsubscribe?lang={code}" lang="{code}" hreflang="{code}">{name}</a>' in nav


@pytest.mark.parametrize("lang", TRANSLATED)
def test_no_english_is_left_on_a_translated_page(client, session, lang):
    make_topic(session, "news", name="N")
    subscriber = make_subscriber(session)
    english = {m for m in source_messages() if " " in m and "%" not in m}
    pages = [
        client.get(f"/u/{unsubscribe_token(subscriber, 'news')}?lang={lang}"),
        client.post(f"/u/{unsubscribe_token(subscriber, 'news')}?lang={lang}"),
        client.get(f"/p/{preferences_token(subscriber)}?lang={lang}"),
        client.get(f"/unsubscribe?lang={lang}"),
        client.post(f"/unsubscribe?lang={lang}", data={"email": "bo@example.com"}),
        client.get(f"/u/broken?lang={lang}"),
        client.get("/no/such/page", headers={"Accept-Language": lang}),
    ]
    for response in pages:
        text = response.get_data(as_text=True)
        assert f'<html lang="{lang}">' in text
        assert [m for m in english if m in text] == []
