"""One definition of the same address; the fast path agrees with email-validator."""

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prefs.domain.addresses import _validated, mailbox, mask, normalize, normalize_all
from prefs.errors import InvalidAddress


@pytest.mark.parametrize(
    ("given_address", "expected"),
    [
        ("a@example.com", "a@example.com"),
        ("A@Example.COM", "a@example.com"),
        ("  Ann.Lee+news@Mail.Example.org \n", "ann.lee+news@mail.example.org"),
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("USER@BÜCHER.DE", "user@xn--bcher-kva.de"),
    ],
)
def test_normalize(given_address, expected):
    assert normalize(given_address) == expected


@pytest.mark.parametrize(
    ("bad", "part"),
    [
        ("", "@"),
        ("no-at-sign", "@"),
        ("a@", "after the @"),
        ("@example.com", "before the @"),
        ("a..b@example.com", "period"),
        ("a@example", "period"),
        ("a@localhost", "period"),
        ("a@x.test", "special"),
        ('"quoted local"@example.com', "quoting"),
        ("a@exa mple.com", "after the @"),
        ("a\r\nBcc: b@example.com", ""),
        ("a\x00@example.com", ""),
        ("a@" + "b" * 300 + ".com", ""),
    ],
)
def test_invalid_addresses_say_which_part_is_wrong(bad, part):
    with pytest.raises(InvalidAddress) as err:
        normalize(bad)
    assert part.lower() in str(err.value).lower()


def test_non_text_is_invalid():
    with pytest.raises(InvalidAddress):
        normalize(None)  # type: ignore[arg-type]


def test_a_batch_answers_each_address_in_order_and_none_for_the_invalid():
    given = ["Ann@Example.COM", " bob@example.org\t", "a@@b", 7, "zoë@bücher.de", "ann@example.com"]
    assert normalize_all(given) == [
        "ann@example.com",
        "bob@example.org",
        None,
        None,
        "zoë@xn--bcher-kva.de",
        "ann@example.com",
    ]


def test_mask_keeps_the_first_letter_and_the_domain():
    assert mask("ann@example.com") == "a***@example.com"


def reference(address: str) -> str | None:
    """Normalize with email-validator alone, the definition the fast path must match."""
    try:
        result = validate_email(address.strip(), check_deliverability=False)
    except EmailNotValidError:
        return None
    return result.local_part.lower() + "@" + result.ascii_domain


atext = st.sampled_from("abcXYZ019_+-.!#$%&'*/=?^`{|}~ \"@\\é")
labels = st.text(alphabet="abcz09-XÉ", min_size=0, max_size=70)
domains = st.lists(labels, min_size=1, max_size=5).map(".".join)
addresses = st.builds(
    lambda local, domain, pad: pad + local + "@" + domain + pad,
    st.text(alphabet=atext, min_size=0, max_size=70),
    st.one_of(domains, st.sampled_from(["example.com", "localhost", "a.test", "x.invalid"])),
    st.sampled_from(["", " ", "\t"]),
)


@settings(max_examples=3000, deadline=None)
@given(addresses)
@example("a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 57)
@example("x" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com")
@example("a.@example.com")
@example("a@-example.com")
@example("a@example.123")
@example('"a@b"@example.com')
@example("a@b@example.com")
@example("a@[127.0.0.1]")
def test_fast_path_agrees_with_email_validator(address):
    expected = reference(address)
    try:
        got = normalize(address)
    except InvalidAddress:
        got = None
    assert got == expected
    # the check's batch loop: alone, and among neighbours that take other paths
    assert normalize_all([address]) == [expected]
    assert normalize_all(["Ann@Example.com", address, "a@@b"]) == ["ann@example.com", expected, None]
    if expected is not None:
        assert _validated(address.strip()) == expected


ascii_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=30)


@settings(max_examples=2000, deadline=None)
@given(ascii_text, ascii_text, ascii_text)
@example('"a', 'b"', "example.com")
@example("a", "[127.0.0.1", "]")
def test_an_ascii_address_with_two_at_signs_is_never_valid(first, second, third):
    # the batch loop turns these down without asking email-validator
    address = first + "@" + second + "@" + third
    assert reference(address) is None
    assert normalize_all([address]) == [None]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("ann@example.com", "ann@example.com"),
        ("ann+news@example.com", "ann@example.com"),
        ("ann+a+b@example.com", "ann@example.com"),
        ("a.nn@example.com", "a.nn@example.com"),
        ("a.n.n+x@gmail.com", "ann@gmail.com"),
        ("ann@googlemail.com", "ann@gmail.com"),
        ("+tag@example.com", "+tag@example.com"),
    ],
)
def test_the_mailbox_an_address_delivers_to(address, expected):
    assert mailbox(address) == expected
