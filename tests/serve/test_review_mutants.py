"""Behaviour the suite did not pin, found by hand mutation testing of serve/ (each test here was seen failing on the
mutant named in its docstring and passing on the real code). No Ray: plain objects and the in-process app."""

from __future__ import annotations

from serve.auth import bearer_token, cross_site


def test_the_bearer_scheme_is_matched_without_regard_to_case_and_spaces():
    """RFC 9110 11.1: the auth scheme is case-insensitive; spaces around the token are not part of it
    (mutants: a case-sensitive 'Bearer ', the token not stripped)."""
    assert bearer_token({"authorization": "bearer k1"}) == b"k1"
    assert bearer_token({"authorization": "BEARER  k1 "}) == b"k1"
    assert bearer_token({"authorization": "Basic k1"}) is None


def test_a_page_of_another_port_or_a_sibling_site_is_cross_site():
    """Sec-Fetch-Site `same-site` is another port or subdomain: not this origin (mutant: only `cross-site`
    refused). An Origin's port is dropped only when it is its own scheme's default: a plain-http page on port 443
    is not this service on port 80 (mutant: either default port dropped from every Origin)."""
    local = {"host": "127.0.0.1:8000"}
    assert cross_site({**local, "sec-fetch-site": "same-site"})
    assert cross_site({"origin": "http://127.0.0.1:443", "host": "127.0.0.1"})
    assert not cross_site({"origin": "http://127.0.0.1", "host": "127.0.0.1:80"})


def test_only_localhost_and_its_subdomains_count_as_a_name_dns_cannot_repoint():
    """`evil-localhost` or `notlocalhost` are DNS names like any other (mutant: any name ENDING in "localhost"
    taken as loopback, so a rebinding page at such a name passed as same-origin)."""
    for host in ("notlocalhost:8000", "evil-localhost"):
        assert cross_site({"host": host, "sec-fetch-site": "same-origin"})
    assert not cross_site({"host": "app.localhost:8000", "sec-fetch-site": "same-origin"})
