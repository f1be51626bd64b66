"""The real fetcher against real HTTP(S) servers on loopback, started in this process.

No database, Redis or queue: these are integration tests of the network edge. The
servers record every request they get, so "refused" also means "never connected".
Allowlists are per test: each names exactly the loopback addresses it may reach.
"""
from __future__ import annotations

import datetime
import hashlib
import socket
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from dpp.adapters.fetcher import USER_AGENT, HttpFetcher, getaddrinfo
from dpp.domain.packs.url import AddressPolicy, FetchLimits, UrlBlocked, UrlFetchFailed, UrlPack

LOOPBACK = AddressPolicy.from_cidrs("127.0.0.1/32")

Route = Callable[[BaseHTTPRequestHandler], None]


class Site:
    """An HTTP server on `host` answering `routes` (path -> handler); `seen` lists requests."""

    def __init__(self, host: str = "127.0.0.1", routes: dict[str, Route] | None = None,
                 tls: ssl.SSLContext | None = None):
        site = self
        self.routes: dict[str, Route] = dict(routes or {})
        self.seen: list[dict] = []
        self.server_names: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                site.seen.append({"path": self.path, "headers": dict(self.headers)})
                route = site.routes.get(self.path.split("?")[0])
                if route is None:
                    send(self, 404, b"not here", "text/plain")
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # failed handshakes, dropped clients
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/", scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", content_type: str | None = "text/html",
         headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    if content_type:
        handler.send_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def page(body: bytes, content_type: str = "text/html; charset=utf-8") -> Route:
    return lambda h: send(h, 200, body, content_type)


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: send(h, status, b"moved", headers={"Location": location})


@pytest.fixture
def sites():
    """Start servers with `sites(host=..., routes=...)`; all are stopped after the test."""
    started: list[Site] = []

    def start(host: str = "127.0.0.1", routes: dict[str, Route] | None = None, tls=None) -> Site:
        site = Site(host, routes, tls)
        started.append(site)
        return site

    yield start
    for site in started:
        site.stop()


def resolver(names: dict[str, list[str]], calls: list | None = None):
    """A getaddrinfo for test names (pages.test -> 127.0.0.1); other names really resolve."""

    def resolve(host: str, port: int):
        if calls is not None:
            calls.append((host, port))
        if host in names:
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (a, port, 0, 0) if ":" in a else (a, port))
                for a in names[host]
            ]
        return getaddrinfo(host, port)

    return resolve


HTML = (b"<html><head><title>Local page</title><meta name=description content='A test page'></head>"
        b"<body><h1>Hello</h1><p>from loopback</p><a href='/next'>next</a> <a href='other.html'>o</a></body></html>")


# --- reaching a page --------------------------------------------------------------------


def test_a_page_is_fetched_from_the_checked_address_with_the_names_host_header(sites):
    site = sites(routes={"/index.html": page(HTML)})
    calls: list = []
    fetcher = HttpFetcher(resolve=resolver({"pages.test": ["127.0.0.1"]}, calls))

    got = fetcher.fetch(site.url("/index.html?x=1#frag", host="pages.test"), FetchLimits(), LOOPBACK)

    assert (got.status, got.body, got.truncated, got.redirects) == (200, HTML, False, ())
    assert got.final_url == site.url("/index.html?x=1", host="pages.test")
    assert got.content_type == "text/html; charset=utf-8"
    assert calls == [("pages.test", site.port)]  # one lookup for the hop, none by http.client
    request = site.seen[0]
    assert request["path"] == "/index.html?x=1"
    assert request["headers"]["Host"] == f"pages.test:{site.port}"
    assert request["headers"]["Accept-Encoding"] == "identity"
    assert request["headers"]["User-Agent"] == USER_AGENT


def test_the_pack_digests_a_real_page(sites):
    site = sites(routes={"/": page(HTML)})
    result = UrlPack(HttpFetcher(), LOOPBACK).run({"url": site.url("/")}, lambda f: None)
    out = result.output
    assert (out["status"], out["title"], out["description"], out["text_excerpt"]) == (
        200, "Local page", "A test page", "Hello from loopback next o")
    assert out["links"] == [site.url("/next"), site.url("/other.html")]
    assert result.actual_cost_micros == 3_001


def test_a_redirect_chain_is_followed_re_resolving_and_re_checking_each_hop(sites):
    site = sites()
    site.routes.update({
        "/a": redirect("/b", 301),
        "/b": redirect(site.url("/c", host="other.test"), 302),
        "/c": redirect("d?x=1", 307),
        "/d": page(HTML),
    })
    calls: list = []
    fetcher = HttpFetcher(resolve=resolver({"pages.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}, calls))

    got = fetcher.fetch(site.url("/a", host="pages.test"), FetchLimits(), LOOPBACK)

    assert got.status == 200 and got.final_url == site.url("/d?x=1", host="other.test")
    assert got.redirects == (site.url("/b", host="pages.test"), site.url("/c", host="other.test"),
                             site.url("/d?x=1", host="other.test"))
    assert calls == [("pages.test", site.port)] * 2 + [("other.test", site.port)] * 2
    assert [r["headers"]["Host"] for r in site.seen] == [f"pages.test:{site.port}"] * 2 + [f"other.test:{site.port}"] * 2


def test_five_redirects_are_followed_and_a_sixth_is_refused(sites):
    site = sites()
    for i in range(1, 6):
        site.routes[f"/r{i}"] = redirect(f"/r{i - 1}")
    site.routes["/r0"] = page(HTML)
    site.routes["/loop"] = redirect("/loop")

    assert HttpFetcher().fetch(site.url("/r5"), FetchLimits(), LOOPBACK).status == 200
    assert len(site.seen) == 6

    site.seen.clear()
    with pytest.raises(UrlFetchFailed, match=r"too many redirects \(more than 5\)") as caught:
        HttpFetcher().fetch(site.url("/loop"), FetchLimits(), LOOPBACK)
    assert caught.value.code == "FETCH_FAILED"
    assert len(site.seen) == 6  # the first request and five redirects, no seventh


# --- refusals ---------------------------------------------------------------------------


def test_localhost_is_refused_by_default_without_connecting(sites):
    site = sites(routes={"/": page(HTML)})
    for url in (site.url("/", host="localhost"), site.url("/")):
        with pytest.raises(UrlBlocked, match=r"\(loopback\)") as caught:
            HttpFetcher().fetch(url, FetchLimits(), AddressPolicy())
        assert caught.value.code == "URL_BLOCKED"
    assert site.seen == []


@pytest.mark.parametrize("target", [
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://0xa9fea9fe/",
    "http://metadata.test/computeMetadata/v1/",
    "http://[fd00:ec2::254]/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "http://user:pw@example.com/",
])
def test_a_redirect_to_a_refused_url_is_refused(sites, target):
    site = sites(routes={"/go": redirect(target)})
    fetcher = HttpFetcher(resolve=resolver({"metadata.test": ["169.254.169.254"]}))
    with pytest.raises(UrlBlocked) as caught:
        fetcher.fetch(site.url("/go"), FetchLimits(), LOOPBACK)
    assert caught.value.code == "URL_BLOCKED"
    assert "169.254.169.254" not in str(caught.value) or "metadata.test" not in target  # DNS answers stay private
    assert [r["path"] for r in site.seen] == ["/go"]


def test_a_redirect_to_another_loopback_address_outside_the_allowlist_is_refused(sites):
    inner = sites(host="127.0.0.2", routes={"/": page(b"<title>secret</title>")})
    outer = sites(routes={"/go": redirect(inner.url("/"))})
    with pytest.raises(UrlBlocked, match=r"address 127\.0\.0\.2 is not allowed \(loopback\)"):
        HttpFetcher().fetch(outer.url("/go"), FetchLimits(), LOOPBACK)
    assert inner.seen == []
    # Allowlisted, the same hop goes through.
    both = AddressPolicy.from_cidrs("127.0.0.1/32,127.0.0.2/32")
    assert HttpFetcher().fetch(outer.url("/go"), FetchLimits(), both).final_url == inner.url("/")


def test_a_name_with_any_refused_address_is_refused_before_connecting(sites):
    site = sites(routes={"/": page(HTML)})
    fetcher = HttpFetcher(resolve=resolver({"mixed.test": ["127.0.0.1", "10.0.0.7"], "v6.test": ["127.0.0.1", "::1"]}))
    with pytest.raises(UrlBlocked, match=r"^mixed\.test resolves to an address that is not allowed \(private\)$"):
        fetcher.fetch(site.url("/", host="mixed.test"), FetchLimits(), LOOPBACK)
    with pytest.raises(UrlBlocked, match=r"\(loopback\)"):
        fetcher.fetch(site.url("/", host="v6.test"), FetchLimits(), LOOPBACK)
    assert site.seen == []


def test_dns_and_connection_failures_are_fetch_failures(sites):
    def no_such_name(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(UrlFetchFailed, match="could not resolve nowhere.test") as caught:
        HttpFetcher(resolve=no_such_name).fetch("http://nowhere.test/", FetchLimits(), LOOPBACK)
    assert caught.value.code == "FETCH_FAILED"

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(UrlFetchFailed, match="could not connect to 127.0.0.1"):
        HttpFetcher().fetch(f"http://127.0.0.1:{port}/", FetchLimits(), LOOPBACK)


# --- caps: bytes and seconds ------------------------------------------------------------


def _endless(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain")
    handler.end_headers()
    try:
        for _ in range(10_000):  # 640 MiB if nobody stopped reading
            handler.wfile.write(b"x" * 65536)
    except OSError:
        pass


def test_a_body_over_max_bytes_is_cut_there(sites):
    site = sites(routes={"/big": page(b"a" * (3 * 1024 * 1024), "text/plain"), "/endless": _endless,
                         "/exact": page(b"b" * 1000, "text/plain")})
    fetcher = HttpFetcher()
    big = fetcher.fetch(site.url("/big"), FetchLimits(max_bytes=1000), LOOPBACK)
    assert (len(big.body), big.truncated) == (1000, True)
    endless = fetcher.fetch(site.url("/endless"), FetchLimits(max_bytes=100_000), LOOPBACK)
    assert (len(endless.body), endless.truncated) == (100_000, True)
    exact = fetcher.fetch(site.url("/exact"), FetchLimits(max_bytes=1000), LOOPBACK)
    assert (len(exact.body), exact.truncated) == (1000, False)


def _silent(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(4)


def _drip_body(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain")
    handler.end_headers()
    try:
        for _ in range(40):  # a byte every 0.1 s: no single read ever times out
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


def _drip_headers(handler: BaseHTTPRequestHandler) -> None:
    try:
        handler.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for _ in range(40):
            handler.wfile.write(b"X")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


@pytest.mark.parametrize("path", ["/silent", "/drip-body", "/drip-headers"])
def test_a_slow_server_runs_out_of_the_total_deadline(sites, path):
    site = sites(routes={"/silent": _silent, "/drip-body": _drip_body, "/drip-headers": _drip_headers})
    started = time.monotonic()
    with pytest.raises(UrlFetchFailed, match=r"timed out after 1s") as caught:
        HttpFetcher().fetch(site.url(path), FetchLimits(timeout_sec=1.0, read_timeout_sec=2.0), LOOPBACK)
    assert caught.value.code == "FETCH_FAILED"
    assert time.monotonic() - started < 2.5


def test_the_deadline_covers_every_hop(sites):
    site = sites()
    site.routes["/slow-hop"] = lambda h: (time.sleep(0.6), send(h, 302, headers={"Location": "/slow-hop"}))
    started = time.monotonic()
    with pytest.raises(UrlFetchFailed, match="timed out after 1.5s"):
        HttpFetcher().fetch(site.url("/slow-hop"), FetchLimits(timeout_sec=1.5), LOOPBACK)
    assert time.monotonic() - started < 2.5


def test_a_non_text_body_is_hashed_but_not_digested(sites):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
    site = sites(routes={"/logo.png": page(png, "image/png"), "/missing": lambda h: send(h, 404, b"<title>Gone</title>")})
    pack = UrlPack(HttpFetcher(), LOOPBACK)
    out = pack.run({"url": site.url("/logo.png")}, lambda f: None).output
    assert (out["status"], out["content_type"], out["digested"], out["bytes"]) == (200, "image/png", False, len(png))
    assert out["content_sha256"] == hashlib.sha256(png).hexdigest() and out["title"] is None
    # An error page is still a fetched page.
    missing = pack.run({"url": site.url("/missing")}, lambda f: None).output
    assert (missing["status"], missing["title"]) == (404, "Gone")


# --- TLS: the packet goes to the checked address, the certificate is checked for the name ---


def _tls_pair(name: str):
    """(server context with a certificate for `name`, client context trusting only its CA)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signing_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpp test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key, ca_key, ca=True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, key, ca_key, ca=False, san=name)

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as chain:
        chain.write(leaf.public_bytes(serialization.Encoding.PEM))
        chain.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        chain.flush()
        server.load_cert_chain(chain.name)
    client = ssl.create_default_context(cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


def test_https_connects_to_the_checked_address_with_sni_and_a_certificate_for_the_name(sites):
    server_ctx, client_ctx = _tls_pair("pages.test")
    site = sites(routes={"/": page(HTML)}, tls=server_ctx)
    fetcher = HttpFetcher(resolve=resolver({"pages.test": ["127.0.0.1"]}), ssl_context=client_ctx)

    got = fetcher.fetch(site.url("/", scheme="https", host="pages.test"), FetchLimits(), LOOPBACK)

    assert (got.status, got.body) == (200, HTML)
    assert site.server_names == ["pages.test"]
    assert site.seen[0]["headers"]["Host"] == f"pages.test:{site.port}"


def test_https_refuses_a_certificate_for_another_name(sites):
    server_ctx, client_ctx = _tls_pair("other.test")
    site = sites(routes={"/": page(HTML)}, tls=server_ctx)
    fetcher = HttpFetcher(resolve=resolver({"pages.test": ["127.0.0.1"]}), ssl_context=client_ctx)
    with pytest.raises(UrlFetchFailed, match="TLS with pages.test failed: .*mismatch") as caught:
        fetcher.fetch(site.url("/", scheme="https", host="pages.test"), FetchLimits(), LOOPBACK)
    assert caught.value.code == "FETCH_FAILED"
    assert site.seen == []
