"""Create, list and archive topics, and resolve a key to the category the rule judges."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidValue, UnknownTopic
from ..models import Topic
from ..store import write_transaction
from .rules import TRANSACTIONAL, TRANSACTIONAL_CATEGORY, Category
from .text import check_text

KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")


def check_key(key: str) -> str:
    """Return a topic key that is well formed and not reserved, or raise ``InvalidValue``."""
    if key == TRANSACTIONAL:
        raise InvalidValue("the key 'transactional' is reserved: transactional mail is always sent")
    if not isinstance(key, str) or not KEY.match(key):
        raise InvalidValue(
            "a topic key is 1 to 64 lower-case letters, digits, '-' or '_', starting with a letter or digit"
        )
    return key


def create_topic(session: Session, key: str, name: str, description: str = "", opt_in: bool = False) -> Topic:
    """Create a marketing topic; ``opt_in`` topics reach only those who chose them."""
    check_key(key)
    name = _name(name)
    description = check_text(description or "", "description")
    with write_transaction(session):
        if session.scalar(select(Topic.id).where(Topic.key == key)) is not None:
            raise Conflict(f"a topic with the key {key!r} exists already")
        topic = Topic(key=key, name=name, description=description, opt_in=opt_in)
        session.add(topic)
    return topic


def _name(name: str | None) -> str:
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise InvalidValue("a topic needs a name of 1 to 200 characters")
    return check_text(name, "name")


def list_topics(session: Session, include_archived: bool = True) -> list[Topic]:
    """Return the topics in the order they were created."""
    query = select(Topic).order_by(Topic.id)
    if not include_archived:
        query = query.where(Topic.archived.is_(False))
    return list(session.scalars(query))


def lookup_key(key: str) -> str:
    """Return a key that could name a topic on file, or raise ``UnknownTopic``."""
    if not isinstance(key, str) or not KEY.match(key):
        # a malformed key names no topic; PostgreSQL would refuse some (NUL) outright
        raise UnknownTopic(f"there is no topic {key!r}")
    return key


def get_topic(session: Session, key: str) -> Topic:
    """Return the topic with this key, or raise ``UnknownTopic``."""
    topic = session.scalar(select(Topic).where(Topic.key == lookup_key(key)))
    if topic is None:
        raise UnknownTopic(f"there is no topic {key!r}")
    return topic


def update_topic(
    session: Session,
    key: str,
    name: str | None = None,
    description: str | None = None,
    archived: bool | None = None,
) -> Topic:
    """Change a topic's name, description or archived flag; its key and default never change."""
    with write_transaction(session):
        topic = get_topic(session, key)
        if name is not None:
            topic.name = _name(name)
        if description is not None:
            topic.description = check_text(description, "description")
        if archived is not None:
            topic.archived = archived
    return topic


def archive_topic(session: Session, key: str) -> Topic:
    """Hide a topic from the preference center; links that name it still unsubscribe."""
    return update_topic(session, key, archived=True)


def category_of(topic: Topic) -> Category:
    """Return the category the rule judges for a topic."""
    return Category(topic.key, topic.opt_in)


def resolve(session: Session, key: str) -> tuple[Category, Topic | None]:
    """Return the category for a key: ``transactional`` or a topic; an unknown key is an error."""
    if key == TRANSACTIONAL:
        return TRANSACTIONAL_CATEGORY, None
    topic = get_topic(session, key)
    return category_of(topic), topic
