"""Topics: keys, the reserved category, archiving."""

import pytest

from prefs.domain import topics
from prefs.domain.rules import TRANSACTIONAL_CATEGORY, Category
from prefs.errors import Conflict, InvalidValue, UnknownTopic
from tests.factories import make_topic


def test_create_get_update_archive(session):
    make_topic(session, "news", name="News")
    topic = topics.update_topic(session, "news", name="Company news", description="Monthly")
    assert (topic.name, topic.description) == ("Company news", "Monthly")
    assert topics.archive_topic(session, "news").archived is True
    assert topics.list_topics(session, include_archived=False) == []
    assert [t.key for t in topics.list_topics(session)] == ["news"]


def test_transactional_is_reserved(session):
    with pytest.raises(InvalidValue):
        topics.create_topic(session, "transactional", "Nope")
    assert topics.resolve(session, "transactional") == (TRANSACTIONAL_CATEGORY, None)


def test_duplicates_and_bad_keys(session):
    make_topic(session, "news")
    with pytest.raises(Conflict):
        make_topic(session, "news")
    for key in ("", "News", "a b", "x" * 65, "-lead"):
        with pytest.raises(InvalidValue):
            topics.create_topic(session, key, "Name")


@pytest.mark.parametrize("key", ["nope", "bad\x00key", "UPPER", "", "x" * 300])
def test_unknown_or_malformed_keys_are_unknown_topics(session, key):
    # a NUL byte once reached PostgreSQL and came back as a 500
    with pytest.raises(UnknownTopic):
        topics.get_topic(session, key)
    with pytest.raises(UnknownTopic):
        topics.resolve(session, key)


def test_resolve_returns_the_category(session):
    make_topic(session, "events", opt_in=True)
    category, topic = topics.resolve(session, "events")
    assert category == Category("events", opt_in=True) and topic.key == "events"


@pytest.mark.parametrize("bad", ["N\ud800", "N\udcff", "N\x00"])
def test_text_neither_database_can_store_is_refused(session, runner, bad):
    make_topic(session, "news")
    for call in (
        lambda: topics.create_topic(session, "other", bad),
        lambda: topics.create_topic(session, "other", "Other", description=bad),
        lambda: topics.update_topic(session, "news", name=bad),
        lambda: topics.update_topic(session, "news", description=bad),
    ):
        with pytest.raises(InvalidValue):
            call()
    # a command line that is not UTF-8 arrives with surrogates in it: one clear line, no trace
    result = runner.invoke(args=["topics", "create", "other", "--name", bad])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot be stored" in result.output
    assert [t.name for t in topics.list_topics(session)] == ["News"]
