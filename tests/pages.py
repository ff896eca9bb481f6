"""What the tests ask of every public page, and the RFC 8058 one-click body."""

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def assert_public_headers(response):
    csp = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "style-src 'self'" in csp
    assert "script-src" not in csp and "default-src 'none'" in csp  # so no script at all
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Robots-Tag"] == "noindex"
    assert "Set-Cookie" not in response.headers
