"""Which Authentication-Results are believed, and what they prove: RFC 8601's examples, providers' headers."""

import pytest

from prefs.domain import authresults

# RFC 8601 Appendix B, each as the top field of a message received by its authserv-id
RFC_EXAMPLES = [
    ("example.org", "example.org 1; none"),
    ("example.com", "example.com; spf=pass smtp.mailfrom=example.net"),
    (
        "example.com",
        "example.com; auth=pass (cram-md5) smtp.auth=sender@example.net; spf=pass smtp.mailfrom=example.net",
    ),
    ("example.com", "example.com; iprev=pass policy.iprev=192.0.2.200"),
    (
        "example.com",
        "example.com; sender-id=fail header.from=example.com; "
        "dkim=pass (good signature) header.d=example.com",
    ),
    (
        "example.com",
        "example.com; dkim=pass (good signature) header.d=mail-router.example.net; "
        "dkim=fail (bad signature) header.d=newyork.example.com",
    ),
    (
        "foo.example.net",
        "foo.example.net (foobar) 1 (baz); dkim (Because I like it) / 1 (One yay) = (wait for it) fail "
        "policy (A dot can go here) . (like that) expired (this surprised me) = (as I wasn't expecting it) "
        "1362471462",
    ),
]


def fields(*pairs):
    return [(name.lower(), value) for name, value in pairs]


@pytest.mark.parametrize(("ours", "value"), RFC_EXAMPLES[:-1])
def test_rfc_examples_are_read_and_prove_no_dmarc(ours, value):
    results = authresults.trusted_results(
        fields(("Authentication-Results", value), ("From", "a@example.com")), ours
    )
    assert results is not None
    assert not authresults.dmarc_proves(results, "example.com")


def test_results_of_ours_that_authres_cannot_read_prove_nothing():
    # authres 1.2 does not read B.7's method version ("dkim / 1"): unreadable, so nothing is proven
    ours, value = RFC_EXAMPLES[-1]
    assert authresults.trusted_results(fields(("Authentication-Results", value)), ours) is None


GMAIL = (
    "mx.google.com;\r\n"
    "       dkim=pass header.i=@victim.example header.s=s1 header.b=AbCdEf12;\r\n"
    "       spf=pass (google.com: domain of bounce@victim.example designates 192.0.2.1 as permitted sender)"
    " smtp.mailfrom=bounce@victim.example;\r\n"
    "       dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=victim.example"
).replace("\r\n", "")
OUTLOOK = (
    "spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=victim.example; dkim=pass (signature was verified) "
    "header.d=victim.example;dmarc=pass action=none header.from=victim.example;compauth=pass reason=100"
)


def test_a_gmail_style_header_of_our_own_proves_its_domain():
    results = authresults.trusted_results(fields(("Authentication-Results", GMAIL)), "mx.google.com")
    assert authresults.dmarc_proves(results, "victim.example")
    assert authresults.dmarc_proves(results, "VICTIM.example.")
    assert not authresults.dmarc_proves(results, "sub.victim.example")
    assert not authresults.dmarc_proves(results, "example")


def test_an_outlook_style_header_without_an_authserv_id_is_never_ours():
    for ours in ("spf=pass", "victim.example", "protection.outlook.com"):
        results = authresults.trusted_results(fields(("Authentication-Results", OUTLOOK)), ours)
        assert not results


def test_results_of_ours_past_the_parsing_budget_prove_nothing():
    value = "mx.prefs.example; dmarc=pass header.from=victim.example " + "(x)" * 1000
    many = fields(*[("Authentication-Results", value)] * 6)
    assert authresults.trusted_results(many, "mx.prefs.example") is None
    assert authresults.dmarc_proves(
        authresults.trusted_results(many[:1], "mx.prefs.example"), "victim.example"
    )


def test_no_results_prove_nothing():
    assert not authresults.dmarc_proves([], "victim.example")
    assert authresults.trusted_results(fields(("From", "a@victim.example")), "mx.prefs.example") == []
