"""``/healthz`` tells whether the database answers."""

from prefs import create_app


def test_healthy(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_unreachable_database_is_503(tmp_path):
    # a directory cannot be opened as a SQLite database
    broken = create_app({"TESTING": True, "SECRET_KEYS": "k" * 20, "DATABASE_URL": f"sqlite:///{tmp_path}"})
    response = broken.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.json["status"] == "unavailable"
