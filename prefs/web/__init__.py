"""What answers HTTP: the hooks, the public pages, the one-click fast path, the API and the admin."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    """Install the app's hooks and blueprints, in the order they must run."""
    from ..ops import health, monitoring
    from . import api, hosts, public, responses
    from .admin import views as admin

    responses.register(app)
    monitoring.register(app)
    # after monitoring's timer starts (a refused host is logged and counted), before anything else
    app.before_request(hosts.refuse_unknown)
    # before any view (or the admin's login) reads the database
    app.before_request(responses.read_body_first)
    public.register(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
