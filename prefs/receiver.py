"""``flask --app prefs smtpd``: an SMTP receiver for the unsubscribe mailbox, fed to ``inbound``."""

from __future__ import annotations

import logging
from typing import Any

from aiosmtpd.controller import Controller
from flask import Flask

from . import inbound
from .extensions import session
from .links import tokens

log = logging.getLogger(__name__)


class UnsubscribeHandler:
    """Take each message for the unsubscribe address and honour what it asks."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    async def handle_DATA(self, server: Any, smtp_session: Any, envelope: Any) -> str:
        with self.app.app_context():
            try:
                outcome = inbound.handle(
                    session(),
                    tokens(),
                    envelope.original_content or envelope.content,
                    list(envelope.rcpt_tos),
                    self.app.config.get("INBOUND_AUTHSERV_ID") or None,
                )
            except inbound.InvalidMessage as err:
                return f"550 5.6.0 {err}"
            finally:
                session().close()
        log.info("inbound mail: %s (%s)", outcome.action, outcome.reason)
        # accepted either way: a refusal would bounce to someone who only asked to leave
        return "250 2.0.0 OK"


def start(app: Flask, host: str, port: int) -> Controller:
    """Start the receiver in a thread and return its controller."""
    controller = Controller(
        UnsubscribeHandler(app), hostname=host, port=port, data_size_limit=inbound.MAX_MESSAGE
    )
    controller.start()
    return controller
