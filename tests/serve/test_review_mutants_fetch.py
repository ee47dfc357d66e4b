"""Behaviour of serve/fetch.py (`audio_url` under the allow-list) and serve/uploads.py (voice upload forms) that the
suite did not pin, found by hand mutation testing: each test here was seen failing on the mutant named in its
docstring and passing on the real code. No Ray: a loopback HTTP server, the parsers called directly."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import inspect
import socket
import time

import pytest
from starlette.requests import Request

from serve import uploads
from serve.fetch import AllowList, FetchRefused, fetch_allowed
from serve.schemas import ApiError
from serve.uploads import form_body_limit, media_type, read_form
from tests.serve.helpers import loopback_http

MAX = 64                                          # max_bytes of the fetches here
CHAIN_CODES = {1: 303, 2: 307, 3: 308, 4: 302}    # a redirect chain's hop n answers this status
CODINGS = {"upper": ["Identity"], "mixed": ["identity, gzip"], "two": ["identity", "gzip"]}


def _answer(handler, status: int, body: bytes = b"", headers=(), length: bool = True) -> None:
    handler.send_response(status)
    for k, v in headers:
        handler.send_header(k, v)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes of the loopback server (HTTP/1.0: a body without Content-Length ends when the connection closes).
    Every request target is recorded in `seen`; an unknown path is answered with its own request target."""

    seen: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append(self.path)
        path, _, query = self.path.partition("?")
        part = path.split("/")
        if path.startswith("/private/"):
            _answer(self, 200, b"SECRET")
        elif path == "/ok/to-private":
            _answer(self, 302, headers=[("Location", "/private/x.wav")])
        elif path.startswith("/ok/chain/"):   # .../<n>: n hops to go, each to `s/<n - 1>`, one folder deeper
            n = int(part[-1])
            if n:
                _answer(self, CHAIN_CODES[n], headers=[("Location", f"s/{n - 1}")])
            else:
                _answer(self, 200, b"DONE")
        elif path == "/ok/no-location":
            _answer(self, 302)
        elif path == "/ok/partial":
            _answer(self, 206, b"RIFF")
        elif path.startswith("/ok/coded/"):
            _answer(self, 200, b"RIFF", [("Content-Encoding", c) for c in CODINGS[part[3]]])
        elif path.startswith("/ok/size/"):           # /ok/size/<n>[?cl]: n bytes, Content-Length when ?cl
            _answer(self, 200, b"x" * int(part[3]), length=query == "cl")
        elif path == "/ok/lies":                      # declares 1 GiB, sends 4 bytes
            _answer(self, 200, b"RIFF", [("Content-Length", str(1 << 30))], length=False)
        elif path == "/ok/drip":                      # 40 bytes, one each 50 ms (2 s in all)
            with contextlib.suppress(OSError):
                _answer(self, 200, headers=[("Content-Length", "40")], length=False)
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
        else:
            _answer(self, 200, self.path.encode())


@pytest.fixture(scope="module")
def server():
    with loopback_http(Handler) as url:
        yield url


def _get(url: str, path: str, **kw) -> bytes:
    return asyncio.run(fetch_allowed(url + path, AllowList([f"{url}/ok/"]), kw.pop("max_bytes", MAX), **kw))


def _refused(url: str, path: str, **kw) -> FetchRefused:
    with pytest.raises(FetchRefused) as e:
        _get(url, path, **kw)
    return e.value


# ---- fetch.py: redirects ----------------------------------------------------------------------------------------------

def test_a_redirect_out_of_the_allowed_folder_is_refused_unfetched(server):
    """Each redirect hop is checked against the allow-list again (mutants: the Location only parsed, not checked;
    httpx left to follow redirects itself): the private path is never requested."""
    Handler.seen.clear()
    err = _refused(server, "/ok/to-private")
    assert err.status == 400 and "allowed_audio_url_prefixes" in str(err)
    assert Handler.seen == ["/ok/to-private"]


def test_three_redirects_are_followed_and_a_fourth_refused(server):
    """At most `max_redirects` hops (3 by default) of any redirect status (303, 307, 308 too), each relative
    Location resolved against the hop that sent it (mutants: one hop fewer or more, a default of 10, only 301/302
    followed, Locations resolved against the first URL)."""
    Handler.seen.clear()
    assert _get(server, "/ok/chain/3") == b"DONE"
    assert Handler.seen == ["/ok/chain/3", "/ok/chain/s/2", "/ok/chain/s/s/1", "/ok/chain/s/s/s/0"]
    assert "more than 3 redirects" in str(_refused(server, "/ok/chain/4"))
    assert "more than 1 redirects" in str(_refused(server, "/ok/chain/2", max_redirects=1))


def test_a_redirect_without_location_is_a_refusal_at_once(server):
    """A 3xx without Location is the server's answer, refused as such after one request (mutant:
    `headers["location"]`, a KeyError that escaped as a 500; before, it was requested again 4 times and refused
    as "more than 3 redirects")."""
    Handler.seen.clear()
    err = _refused(server, "/ok/no-location")
    assert err.status == 400 and "HTTP 302" in str(err) and Handler.seen == ["/ok/no-location"]


def test_only_a_200_answer_is_the_audio(server):
    """A 206 (part of a file) is no reference audio (mutant: every status under 400 taken)."""
    assert "HTTP 206" in str(_refused(server, "/ok/partial"))


# ---- fetch.py: what is requested --------------------------------------------------------------------------------------

def test_the_server_is_sent_the_normalised_path_and_the_query(server):
    """The request goes to the NORMALISED URL: dot segments resolved, every segment percent-encoded again (so an
    escaped '%' stays escaped: no second decoding on the server) and the query kept (mutants: the URL as sent by
    the client, segments joined unescaped, '%' left bare, the query dropped)."""
    assert _get(server, "/ok/x/%2e%2e/echo/./a%2541%3F.wav?q=1", max_bytes=1024) == b"/ok/echo/a%2541%3F.wav?q=1"


def test_environment_proxies_are_not_used(server, monkeypatch):
    """(mutant: trust_env=True, the fetch went through HTTP_PROXY)"""

    class Proxy(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            _answer(self, 200, b"PROXY")

    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    with loopback_http(Proxy) as proxy:
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, proxy)
        assert _get(server, "/ok/echo/a.wav", max_bytes=1024) == b"/ok/echo/a.wav"


def test_a_server_that_cannot_be_reached_is_a_refusal():
    """httpx's connection errors are a 400, not an unhandled exception (mutant: httpx.HTTPError not mapped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _refused(f"http://127.0.0.1:{port}", "/ok/a.wav", timeout_s=5)
    assert err.status == 400 and "ConnectError" in str(err)


# ---- fetch.py: what is read -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["mixed", "two"])
def test_any_content_coding_besides_identity_is_refused(server, key):
    """`identity, gzip` in one header or in two is still gzip (mutants: refused only when no coding is identity,
    only the first coding looked at)."""
    assert "Content-Encoding" in str(_refused(server, f"/ok/coded/{key}"))


def test_content_codings_are_compared_without_regard_to_case(server):
    """RFC 9110 8.4.1: content codings are case-insensitive; `Identity` is the bytes themselves (mutant: compared
    as written, a 400)."""
    assert _get(server, "/ok/coded/upper") == b"RIFF"


@pytest.mark.parametrize("query", ["cl", ""], ids=["content-length", "close-delimited"])
def test_a_body_of_exactly_max_bytes_is_taken_and_one_byte_more_is_a_413(server, query):
    """The size limit is `max_bytes` inclusive, whether the length is declared or not, and beyond it is a 413
    (FetchTooLarge), not a 400 (mutants: >= for either check, one byte of slack, no check on the bytes read, a
    FetchRefused raised or re-wrapped instead, FetchTooLarge.status 400)."""
    assert _get(server, f"/ok/size/{MAX}?{query}") == b"x" * MAX
    err = _refused(server, f"/ok/size/{MAX + 1}?{query}")
    assert err.status == 413 and f"larger than {MAX} bytes" in str(err), err


def test_a_declared_length_over_max_bytes_is_a_413_before_the_body_is_read(server):
    """The Content-Length is checked before any byte of the body (mutant: not checked: the server that declares
    1 GiB and sends 4 bytes was read until it closed, a 400)."""
    assert _refused(server, "/ok/lies").status == 413


def test_the_whole_fetch_has_one_deadline(server):
    """`timeout_s` bounds the whole answer, not each read: a server dripping a byte every 50 ms is cut off (mutants:
    no total deadline, the 2 s body fetched; asyncio's TimeoutError not mapped). The default is 15 s."""
    assert "within 0.3 s" in str(_refused(server, "/ok/drip", timeout_s=0.3))   # the whole body takes 2 s
    assert inspect.signature(fetch_allowed).parameters["timeout_s"].default == 15.0


def test_fetching_is_disabled_without_prefixes(server):
    """(mutants: an empty allow-list taken as configured; the check dropped: the answer said "not under any prefix"
    instead of how to enable fetching)"""
    with pytest.raises(FetchRefused, match="disabled"):
        asyncio.run(fetch_allowed(f"{server}/ok/a.wav", AllowList([]), MAX))


# ---- fetch.py: the allow-list (no network) ----------------------------------------------------------------------------

LONG = "http://127.0.0.1:9/ok/"


@pytest.mark.parametrize("prefixes,url,normalised", [
    (["http://[::1]:9/ok/"], "http://[::1]:9/ok/a.wav", "http://[::1]:9/ok/a.wav"),
    (["http://127.0.0.1:80/ok/"], "http://127.0.0.1/ok/a.wav", "http://127.0.0.1/ok/a.wav"),
    (["https://media.example:443/ok/"], "https://media.example/ok/a.wav", "https://media.example/ok/a.wav"),
    (["http://media.example:9/ok/"], "http://MEDIA.Example.:9/ok/a.wav", "http://media.example:9/ok/a.wav"),
    (["http://xn--bcher-kva.example/ok/"], "http://B\u00fccher.example/ok/a.wav",
     "http://xn--bcher-kva.example/ok/a.wav"),
    (["http://127.0.0.1:9/ok/"], "http://127.0.0.1:9/ok/./sub/%61.wav", "http://127.0.0.1:9/ok/sub/a.wav"),
    (["http://127.0.0.1:9/other/", "http://127.0.0.1:9/ok/"], "http://127.0.0.1:9/ok/a.wav",
     "http://127.0.0.1:9/ok/a.wav"),
    (["http://127.0.0.1:9/ok/"], LONG + "a" * (4096 - len(LONG)), LONG + "a" * (4096 - len(LONG))),
], ids=["ipv6", "port-80", "port-443", "trailing-dot", "idna", "dot-segment", "second-prefix", "4096-chars"])
def test_urls_the_allow_list_takes_and_their_normal_form(prefixes, url, normalised):
    """Fields compared after normalising: an IPv6 literal bracketed again, a default port (80/443) left out and
    equal to the explicit one, the host's case and trailing dot dropped, IDNA, "." segments and escapes of
    unreserved characters; any of the prefixes; a URL of 4096 characters (mutants: each normalisation step
    dropped, the default port always 80, only the first prefix tried, the length bound off by one)."""
    assert AllowList(prefixes).check(url).url() == normalised


@pytest.mark.parametrize("url", [
    LONG + "a" * (4097 - len(LONG)),
    LONG + "a b.wav", LONG + "a.wav?q=a b", LONG + "a.wav?q=\\", LONG + "a.wav?q=\udc00",
    "http://u:p@127.0.0.1:9/ok/a.wav", "http://u@127.0.0.1:9/ok/a.wav",
    LONG + "%ff.wav", LONG + "a%2f..%2f..%2fsecret", LONG + "a%5c..%5c..%5csecret", LONG + "a%00.wav",
    "http://127.0.0.1:9/../ok/a.wav", "http://127.0.0.1:99999/ok/a.wav",
], ids=["4097-chars", "space-in-path", "space-in-query", "backslash-in-query", "lone-surrogate", "user-password",
        "user", "non-utf8-escape", "escaped-slash", "escaped-backslash", "escaped-nul", "above-root", "bad-port"])
def test_urls_the_allow_list_refuses(url):
    """Each a FetchRefused (a 400), even under the allowed folder (mutants: the length bound off by one, space,
    backslash or a lone surrogate let through, user@ without a password, non-UTF-8 escapes replaced, escaped
    '/', '\\' or NUL inside a segment, '..' above the root clamped to it, a bad port a plain ValueError)."""
    with pytest.raises(FetchRefused):
        AllowList([LONG]).check(url)


# ---- uploads.py -------------------------------------------------------------------------------------------------------

def _multipart(*parts: tuple[str, bytes, str | None]) -> bytes:
    """A multipart body (boundary B) of (name, value, filename or None for a text field) parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--B\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + b"--B--\r\n"


def _read(body: bytes, multipart: bool = True, max_upload_bytes: int = 10):
    """read_form over a request that sends `body` in one piece with its Content-Length."""
    ctype = b"multipart/form-data; boundary=B" if multipart else b"application/x-www-form-urlencoded"
    chunks = [body]

    async def receive():
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/audio/voices", "query_string": b"",
             "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]}
    return asyncio.run(read_form(Request(scope, receive), max_upload_bytes))


def _form_error(body: bytes, multipart: bool = True) -> ApiError:
    with pytest.raises(ApiError) as e:
        _read(body, multipart)
    return e.value


def test_a_file_of_exactly_the_upload_limit_is_read_with_the_other_fields():
    """`file` may have `max_upload_bytes` (mutant: >=, a 413), and the form's bound leaves room for the other
    fields even when the limit is tiny (mutant: no FORM_SLACK_BYTES, a 10-byte upload's form refused)."""
    body = _multipart(("name", b"v", None), ("ref_text", b"A reference.", None), ("file", b"x" * 10, "a.wav"))
    assert _read(body) == (b"x" * 10, {"name": "v", "ref_text": "A reference."})


def test_a_declared_length_of_exactly_the_forms_bound_is_read():
    """(mutant: `declared >= limit`, a 413 for a body the streamed bound takes)"""
    limit = form_body_limit(10)
    assert _read(b"a=" + b"x" * (limit - 2), multipart=False) == (None, {"a": "x" * (limit - 2)})


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "urlencoded"])
def test_a_form_has_at_most_sixteen_fields(multipart):
    """MAX_FIELDS (16) for both form types: 16 are read, 17 are a 400 naming body (mutants: no field limit for
    either parser, 15 or 17)."""
    def body(n: int) -> bytes:
        if multipart:
            return _multipart(*[(f"f{i}", b"v", None) for i in range(n)])
        return "&".join(f"f{i}=v" for i in range(n)).encode()

    assert len(_read(body(16), multipart)[1]) == 16
    err = _form_error(body(17), multipart)
    assert (err.status, err.param) == (400, "body") and "Too many fields" in err.message, err


def test_file_sent_as_a_text_field_is_a_400_naming_file():
    """(mutants: not checked: `str.read`, an AttributeError and a 500; the error naming body)"""
    err = _form_error(_multipart(("file", b"RIFF", None)))
    assert (err.status, err.param) == (400, "file"), err


def test_a_long_field_name_sent_as_a_file_is_not_echoed_in_full():
    """The field's name is cut to ECHO_CHARS (40) in the message and in `param` (mutants: echoed whole)."""
    err = _form_error(_multipart(("n" * 1000, b"RIFF", "a.wav")))
    assert err.param == "n" * 40 and err.message.startswith("n" * 40 + ":") and "n" * 41 not in err.message


@pytest.mark.parametrize("size", [10, 11], ids=["taken", "too-large"])
def test_the_forms_files_are_closed_when_it_is_read(monkeypatch, size):
    """The parsed form (its spooled files) is closed whether the upload is taken or refused (mutant: left open
    until garbage collection, a temporary file each)."""
    forms = []
    split = uploads._split

    async def keep(form, max_upload_bytes):
        forms.append(form)
        return await split(form, max_upload_bytes)

    monkeypatch.setattr(uploads, "_split", keep)
    with contextlib.suppress(ApiError):
        _read(_multipart(("file", b"x" * size, "a.wav")))
    files = [v for _, v in forms[0].multi_items() if not isinstance(v, str)]
    assert len(files) == 1 and files[0].file.closed


def test_a_media_type_is_read_without_the_spaces_around_it():
    """RFC 9110 5.6.6: whitespace may precede the `;` of the parameters (mutant: kept, so this form was a 415)."""
    assert media_type({"content-type": " Multipart/Form-Data ; boundary=B"}) == "multipart/form-data"
