"""The `url` pack: fetch one http(s) URL and digest it, without becoming an SSRF proxy.

Pure like every pack: the network lives in a fetcher injected at construction
(`dpp.adapters.fetcher.HttpFetcher`); what may be reached is decided here.

Why an address policy instead of a host blocklist: names lie (DNS can answer anything,
and may answer differently the second time), so the fetcher resolves each hop once,
asks `AddressPolicy.refusal` about every address it got, and connects only to one of
those addresses. A literal address in the submitted URL makes the answer certain, so
`validate` refuses it at submission (422) and nobody pays; anything else is refused at
run time (FAILED `URL_BLOCKED`, minimum fee: the run started).

Documented behaviour (the tests hold it to this):
- Refused: unspecified (0.0.0.0/8, ::), loopback, private (RFC 1918, 100.64/10 shared,
  fc00::/7, fec0::/10), link-local (169.254/16, fe80::/10), multicast, broadcast,
  reserved and documentation ranges, Teredo, cloud metadata endpoints, and anything
  `ipaddress` does not call global. IPv4 carried in IPv6 (mapped, compatible,
  translated, 6to4, NAT64 64:ff9b::/96) is judged by the IPv4 it carries.
- `DPP_URL_ALLOWLIST` CIDRs are allowed whatever the category (tests point the pack
  at local servers). By default nothing is allowed: `http://localhost/` is refused.
- IPv4 literals in their legacy forms (`0x7f000001`, `2130706433`, `127.1`, `0177.0.0.1`)
  are read as the resolver would, so they cannot slip past as "names".
- At most MAX_REDIRECTS redirects, each re-validated, re-resolved and re-checked.
- Only `text/html` and `text/plain` are digested; any other type still reports
  status, final URL, bytes and SHA-256, with `digested: false` and no text or links.
- A body over `max_bytes` is cut there (`truncated: true`); `content_sha256` and the
  price are over the bytes read, so the same content always costs the same.
- A final status of 4xx/5xx is a result, not a failure: the page was fetched.
"""
from __future__ import annotations

import codecs
import hashlib
import ipaddress
import math
import re
from dataclasses import dataclass
from html import unescape
from html.parser import HTMLParser
from typing import Any, Iterable, Protocol
from urllib.parse import quote, urldefrag, urljoin, urlsplit

from dpp.domain.errors import InvalidPackInputs, PackFailed
from dpp.domain.packs.base import PackResult, Progress

# --- errors -----------------------------------------------------------------------------


class UrlFetchFailed(PackFailed):
    """The fetch itself failed: DNS, connect, TLS, timeout, too many redirects, bad HTTP."""

    code = "FETCH_FAILED"


class UrlBlocked(UrlFetchFailed):
    """The URL, a redirect or an address it resolves to is not allowed."""

    code = "URL_BLOCKED"


# --- prices and limits ------------------------------------------------------------------

PRICE: dict[str, int] = {"base_micros": 3_000, "per_kib_micros": 1}
"""Public price in USD micros: base + per_kib × ceil(bytes read / 1024); bytes read are
at most `max_bytes` (≤ 1 MiB), so a run costs at most 4,024 micros."""

MAX_URL_CHARS = 2048
MAX_HOST_CHARS = 253
MAX_BYTES_LIMIT = 1024 * 1024
DEFAULT_MAX_BYTES = 512 * 1024
MAX_EXCERPT_CHARS = 5000
DEFAULT_EXCERPT_CHARS = 1000
MAX_LINKS_LIMIT = 200
DEFAULT_MAX_LINKS = 50
MAX_TITLE_CHARS = 1000
MAX_DESCRIPTION_CHARS = 2000
MAX_REDIRECTS = 5
TIMEOUT_SEC = 15.0  # whole fetch, every hop included
CONNECT_TIMEOUT_SEC = 5.0
READ_TIMEOUT_SEC = 10.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DIGESTED_TYPES = ("text/html", "text/plain")
_FIELDS = frozenset({"url", "max_bytes", "excerpt_chars", "max_links"})
_INTEGERS = (
    # field, low, high, default
    ("max_bytes", 1, MAX_BYTES_LIMIT, DEFAULT_MAX_BYTES),
    ("excerpt_chars", 0, MAX_EXCERPT_CHARS, DEFAULT_EXCERPT_CHARS),
    ("max_links", 0, MAX_LINKS_LIMIT, DEFAULT_MAX_LINKS),
)

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "format": "uri", "maxLength": MAX_URL_CHARS,
                "description": "http or https, ASCII, no credentials; private and metadata addresses are refused"},
        "max_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_BYTES_LIMIT, "default": DEFAULT_MAX_BYTES},
        "excerpt_chars": {"type": "integer", "minimum": 0, "maximum": MAX_EXCERPT_CHARS,
                          "default": DEFAULT_EXCERPT_CHARS},
        "max_links": {"type": "integer", "minimum": 0, "maximum": MAX_LINKS_LIMIT, "default": DEFAULT_MAX_LINKS},
    },
}


def cost_micros(bytes_read: int) -> int:
    return PRICE["base_micros"] + PRICE["per_kib_micros"] * math.ceil(bytes_read / 1024)


# --- address policy ---------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CLOUD_METADATA = "cloud metadata"
# Checked in order: the first match names the reason. Explicit rather than
# `is_private`, whose lists changed between 3.11 patch releases.
_BLOCKED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("169.254.169.254/32", _CLOUD_METADATA),  # AWS, GCP, Azure, OCI, DigitalOcean, ...
        ("169.254.170.2/32", _CLOUD_METADATA),  # AWS ECS task metadata
        ("100.100.100.200/32", _CLOUD_METADATA),  # Alibaba Cloud
        ("168.63.129.16/32", _CLOUD_METADATA),  # Azure wire server (a public address)
        ("fd00:ec2::254/128", _CLOUD_METADATA),  # AWS IMDS over IPv6
        ("0.0.0.0/8", "unspecified"),  # Linux connects 0.x.x.x to the local host
        ("::/128", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "private"),  # carrier-grade NAT, shared address space
        ("fc00::/7", "private"),
        ("fec0::/10", "private"),  # deprecated site-local
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),  # 6to4 relay anycast
        ("2001::/32", "reserved"),  # Teredo: its IPv4 is obfuscated, so refuse it whole
        ("2001:db8::/32", "reserved"),
        ("100::/64", "reserved"),
        ("64:ff9b:1::/48", "reserved"),  # local-use NAT64
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")


def embedded_ipv4(ip: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """(form, IPv4) when an IPv6 address carries an IPv4 address a packet could reach."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", low32
    if ip in _IPV4_TRANSLATED:
        return "IPv4-translated", low32
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves
        return "IPv4-compatible", low32
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why an address may not be fetched from, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
    carried = embedded_ipv4(ip)
    if carried is not None:
        form, v4 = carried
        inner = blocked_reason(v4)
        return f"{inner} via {form} {v4}" if inner else None
    for network, reason in _BLOCKED:
        if ip.version == network.version and ip in network:
            return reason
    if not ip.is_global:
        return "reserved"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses the fetcher may connect to: public ones, plus the allowlist."""

    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str] | str) -> "AddressPolicy":
        """From CIDRs (a list, or one comma-separated string); a bad one raises ValueError."""
        if isinstance(cidrs, str):
            cidrs = cidrs.split(",")
        return cls(tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()))

    def refusal(self, address: IPAddress | str) -> str | None:
        """None when the address may be fetched from, else why not."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
        carried = embedded_ipv4(ip)
        candidates = (ip, carried[1]) if carried else (ip,)
        if any(c.version == net.version and c in net for c in candidates for net in self.allow):
            return None
        return blocked_reason(ip)


def show_address(ip: IPAddress) -> str:
    """`::ffff:169.254.169.254` rather than 3.11's `::ffff:a9fe:a9fe`."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


# --- URLs -------------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC_PART = re.compile(r"0[xX][0-9A-Fa-f]*|[0-9]+")


class _BadHost(ValueError):
    pass


def ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a resolver reads in `host` (all inet_aton forms), or None for a name.

    A host whose last label is a number is an address or nothing (as in browsers),
    so `1.2.3.999` is an error rather than a name to look up.
    """
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if not _NUMERIC_PART.fullmatch(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMERIC_PART.fullmatch(label) for label in labels):
        raise _BadHost("is not a valid IPv4 address")
    values = []
    for label in labels:
        if label[:2].lower() == "0x":
            values.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            if not set(label) <= set("01234567"):
                raise _BadHost("is not a valid IPv4 address")
            values.append(int(label, 8))
        else:
            values.append(int(label))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise _BadHost("is not a valid IPv4 address")
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def host_address(host: str) -> IPAddress | None:
    """The literal address of a URL's host (brackets already stripped), else None.

    Raises _BadHost for a host that is neither a valid name nor a valid address.
    """
    if ":" in host:
        if "%" in host:
            raise _BadHost("must not carry an IPv6 zone")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise _BadHost("is not a valid IPv6 address") from None
    if not host or len(host) > MAX_HOST_CHARS:
        raise _BadHost(f"must be 1 to {MAX_HOST_CHARS} characters")
    literal = ipv4_literal(host)
    if literal is not None:
        return literal
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise _BadHost("is not a valid host name")
    return None


def url_problem(url: Any) -> str | None:
    """Why `url` cannot be fetched as given (shape only, no address policy), or None."""
    if not isinstance(url, str):
        return "must be a string"
    if not url:
        return "must not be empty"
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    if not all("!" <= ch <= "~" for ch in url):
        return "must be ASCII without spaces or control characters (percent-encode them)"
    if "\\" in url:
        return "must not contain backslashes"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "scheme must be http or https"
    if not url[len(parts.scheme):].startswith("://") or not parts.netloc:
        return "must be an absolute URL (scheme://host/...)"
    if "@" in parts.netloc:
        return "must not contain credentials (user:password@)"
    if port == 0:
        return "has an invalid port"
    try:
        host_address(parts.hostname or "")
    except _BadHost as exc:
        return f"host {exc}"
    return None


@dataclass(frozen=True)
class Target:
    """One HTTP request a URL stands for: where to connect and what to send."""

    url: str  # without fragment
    scheme: str
    host: str  # lower case, no brackets; the TLS server name
    port: int
    path: str  # path and query, as sent
    host_header: str
    address: IPAddress | None  # the literal address, when the host is one


def request_target(url: str) -> Target:
    """The request for `url`; raises UrlBlocked for a URL that may not be fetched."""
    problem = url_problem(url)
    if problem:
        raise UrlBlocked(f"URL {problem}")
    url = urldefrag(url).url
    parts = urlsplit(url)
    host = parts.hostname or ""
    default_port = 443 if parts.scheme == "https" else 80
    port = parts.port or default_port
    shown = f"[{host}]" if ":" in host else host
    return Target(
        url=url,
        scheme=parts.scheme,
        host=host,
        port=port,
        path=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        host_header=shown if port == default_port else f"{shown}:{port}",
        address=host_address(host),
    )


def redirect_url(current: str, location: str) -> str:
    """Where a Location header points, as a browser would read it (then re-validated)."""
    location = location.strip().replace("\\", "/")
    # Servers send raw spaces and UTF-8 in Location; percent-encode them as browsers do.
    location = quote(location, safe="!#$%&'()*+,/:;=?@[]~")
    return urldefrag(urljoin(current, location)).url


# --- the fetcher's contract -------------------------------------------------------------


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = MAX_REDIRECTS
    timeout_sec: float = TIMEOUT_SEC
    connect_timeout_sec: float = CONNECT_TIMEOUT_SEC
    read_timeout_sec: float = READ_TIMEOUT_SEC


@dataclass(frozen=True)
class Fetched:
    final_url: str
    status: int
    content_type: str | None  # the header as sent
    body: bytes  # at most max_bytes
    truncated: bool
    redirects: tuple[str, ...] = ()  # each URL followed, in order


class Fetcher(Protocol):
    def fetch(self, url: str, limits: FetchLimits, policy: AddressPolicy) -> Fetched:
        """GET `url`, following up to `limits.max_redirects` redirects.

        Connects only to addresses `policy` allows (raising UrlBlocked otherwise);
        raises UrlFetchFailed when the fetch fails or runs out of time.
        """


# --- the digest -------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 "
    "header hr li main nav ol p pre section table td th tr ul".split()
)
# Not "head": an unclosed <head> would hide the whole page; what it holds is not text anyway.
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "svg", "math"})
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.I)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# The encodings a page may declare and we decode: the WHATWG Encoding Standard's
# (by Python's canonical names). Python knows many more, and some are traps for a
# worker: `punycode` decodes in quadratic time (a 1 MiB body pins a CPU for
# minutes), `idna`, `utf-7`, `hex`, `rot13`, `zlib` are not page encodings at all.
# Any other declared charset falls back to UTF-8 with replacement.
PAGE_CODECS = frozenset({
    "utf-8", "utf-16", "utf-16-le", "utf-16-be", "ascii",
    *(f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)),
    *(f"cp{n}" for n in range(1250, 1259)), "cp866", "koi8-r", "koi8-u", "mac-roman", "mac-cyrillic",
    "shift_jis", "euc_jp", "iso2022_jp", "gb2312", "gbk", "gb18030", "big5", "euc_kr",
})
_SPACE = re.compile(r"\s+")
FEED_CHARS = 64 * 1024


def media_type(content_type: str | None) -> tuple[str | None, str | None]:
    """(type/subtype in lower case, charset parameter) of a Content-Type header."""
    if not content_type:
        return None, None
    kind, *params = content_type.split(";")
    charset = None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip("\"'") or None
    return kind.strip().lower() or None, charset


def decode(body: bytes, header_charset: str | None, html: bool) -> tuple[str, str]:
    """(text, codec name): BOM, then the header's charset, then <meta>, then UTF-8."""
    candidates: list[str] = [name for bom, name in _BOMS if body.startswith(bom)]
    if header_charset:
        candidates.append(header_charset)
    if html:
        found = _META_CHARSET.search(body[:1024])
        if found:
            candidates.append(found.group(1).decode("ascii"))
    for name in candidates:
        try:
            codec = codecs.lookup(name)
        except (LookupError, TypeError, ValueError):
            continue  # unknown
        if codec.name not in PAGE_CODECS:
            continue  # known to Python but not a web page's encoding: see PAGE_CODECS
        text = body.decode(codec.name, "replace")
        return text.removeprefix("\ufeff"), codec.name
    return body.decode("utf-8", "replace").removeprefix("\ufeff"), "utf-8"


def _collapse(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


# The digest's CPU budget, in parser events (tags and text runs): a page
# of 1 MiB has tens of thousands. Counted, not timed, so the digest of a body is
# the same on every machine; past it the digest keeps what it has read.
MAX_PARSER_EVENTS = 200_000
# An unfinished construct (a tag never closed) is re-scanned by every feed while
# it is held back: past this length it is dropped up to the next `>` (an inline
# data: image ends there too), so each feed scans at most this much more than its
# chunk (`<a ` + 780k attributes took 1.1 s, now 0.06).
MAX_PENDING_CHARS = 64 * 1024


class _OverBudget(Exception):
    pass


class _Digester(HTMLParser):
    """Title, description, base, links and visible text, in one pass."""

    def __init__(self, excerpt_chars: int):
        super().__init__(convert_charrefs=True)
        self.excerpt_chars = excerpt_chars
        self.events = 0
        self.title: list[str] | None = None
        self.title_chars = 0
        self.title_done = False
        self.in_title = False
        self.description: str | None = None
        self.og_description: str | None = None
        self.base: str | None = None
        self.hrefs: list[str] = []
        self.text: list[str] = []
        self.text_chars = 0
        self.skip: list[str] = []  # open elements whose text is not visible

    def _spend(self) -> None:
        self.events += 1
        if self.events > MAX_PARSER_EVENTS:
            raise _OverBudget

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._spend()
        values = {k: v for k, v in reversed(attrs) if v is not None}  # first occurrence wins
        if tag == "title" and not self.title_done and not self.skip:
            self.in_title, self.title, self.title_chars = True, [], 0
        elif tag == "meta":
            name = (values.get("name") or values.get("property") or "").strip().lower()
            if name == "description" and self.description is None:
                self.description = values.get("content", "")
            elif name == "og:description" and self.og_description is None:
                self.og_description = values.get("content", "")
        elif tag == "base" and self.base is None and "href" in values:
            self.base = values["href"]
        elif tag in ("a", "area") and "href" in values:
            self.hrefs.append(values["href"])
        if tag in _SKIP_TAGS:
            self.skip.append(tag)
        elif tag in _BLOCK_TAGS:
            self._add_text(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <x/>: never opens an element, so it cannot start a skipped region.
        if tag in _SKIP_TAGS:
            return
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self._spend()
        if tag == "title" and self.in_title:
            self.in_title, self.title_done = False, True
        if tag in self.skip:
            while self.skip and self.skip.pop() != tag:
                pass
        elif tag in _BLOCK_TAGS:
            self._add_text(" ")

    def handle_data(self, data: str) -> None:
        self._spend()
        if self.in_title:
            # A running count: summing the parts on every call was quadratic, and
            # `<title>` + 780k `<` (one call each) took 35 s of CPU.
            if self.title_chars <= MAX_TITLE_CHARS * 2:
                self.title.append(data)
                self.title_chars += len(data)
        elif not self.skip:
            self._add_text(data)

    def _add_text(self, data: str) -> None:
        # Keep text until the excerpt is sure to be full once whitespace collapses
        # (collapsing each part alone under-counts the joined text, never over-counts).
        if self.text_chars <= self.excerpt_chars:
            self.text.append(data)
            self.text_chars += len(_collapse(data))

    def digest_text(self) -> str:
        return _collapse("".join(self.text))[: self.excerpt_chars].rstrip()


def _clean_href(href: str) -> str:
    return href.strip().replace("\t", "").replace("\n", "").replace("\r", "")


def _absolute_links(hrefs: list[str], base: str, max_links: int) -> list[str]:
    links: dict[str, None] = {}
    for href in hrefs:
        if len(links) >= max_links:
            break
        try:
            link = urldefrag(urljoin(base, _clean_href(href))).url
        except ValueError:
            continue
        if link and urlsplit(link).scheme in ("http", "https"):
            links.setdefault(link, None)
    return list(links)


def digest_html(text: str, final_url: str, excerpt_chars: int, max_links: int) -> dict[str, Any]:
    """Title, description, visible text excerpt and absolute links of an HTML document.

    Fed in chunks and never `close()`d: CPython 3.11's parser falls into quadratic
    time on an unterminated construct at EOF (CVE-2025-6069), and a browser drops an
    unfinished tag there anyway. The chunk size is fixed, so the digest is too.
    """
    parser = _Digester(excerpt_chars)
    try:
        dropping = False
        for start in range(0, len(text), FEED_CHARS):
            chunk = text[start : start + FEED_CHARS]
            if dropping:
                end = chunk.find(">")
                if end < 0:
                    continue
                chunk, dropping = chunk[end + 1 :], False
            parser.feed(chunk)
            # Not inside <script> or <style>: their content is held until the end
            # tag, found by one regex scan (cheap), and dropping it would lose that tag.
            if len(parser.rawdata) > MAX_PENDING_CHARS and parser.cdata_elem is None:
                parser.rawdata, dropping = "", True
        rest = parser.rawdata
        if rest and not rest.startswith("<"):  # text held back for a possible charref
            parser.handle_data(unescape(rest))
    except _OverBudget:  # keep what was read (MAX_PARSER_EVENTS)
        pass
    # 3.11 asserts on some malformed markup; keep what was read. Only the parser's
    # own errors: anything else (the worker's time limit) must reach the worker.
    except (AssertionError, ValueError, IndexError):
        pass
    base = final_url
    if parser.base is not None:
        try:
            base = urljoin(final_url, _clean_href(parser.base))
        except ValueError:
            pass
    title = _collapse("".join(parser.title))[:MAX_TITLE_CHARS] if parser.title is not None else None
    description = parser.description if parser.description is not None else parser.og_description
    return {
        "title": title,
        "description": _collapse(description)[:MAX_DESCRIPTION_CHARS] if description is not None else None,
        "text_excerpt": parser.digest_text(),
        "links": _absolute_links(parser.hrefs, base, max_links),
    }


def digest(url: str, fetched: Fetched, excerpt_chars: int, max_links: int) -> dict[str, Any]:
    """The pack's output for one fetch. Depends only on its arguments."""
    kind, header_charset = media_type(fetched.content_type)
    out: dict[str, Any] = {
        "url": url,
        "final_url": fetched.final_url,
        "status": fetched.status,
        "redirects": list(fetched.redirects),
        "content_type": kind,
        "charset": None,
        "bytes": len(fetched.body),
        "truncated": fetched.truncated,
        "content_sha256": hashlib.sha256(fetched.body).hexdigest(),
        "digested": kind in DIGESTED_TYPES,
        "title": None,
        "description": None,
        "text_excerpt": "",
        "links": [],
    }
    if kind == "text/html":
        text, out["charset"] = decode(fetched.body, header_charset, html=True)
        out.update(digest_html(text, fetched.final_url, excerpt_chars, max_links))
    elif kind == "text/plain":
        text, out["charset"] = decode(fetched.body, header_charset, html=False)
        out["text_excerpt"] = _collapse(text)[:excerpt_chars].rstrip()
    return out


# --- the pack ---------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(raw: Any, policy: AddressPolicy | None) -> dict[str, Any]:
    """Normalised inputs; with a policy, a URL whose literal address it refuses is an error."""
    if not isinstance(raw, dict):
        raise InvalidPackInputs({"inputs": ["must be an object"]})
    errors: dict[str, list[str]] = {}
    for key in sorted(set(raw) - _FIELDS, key=str):
        errors.setdefault(f"inputs.{key}", []).append("unknown field")

    out: dict[str, Any] = {}
    if "url" not in raw:
        errors.setdefault("inputs.url", []).append("required")
    else:
        url = raw["url"]
        problem = url_problem(url)
        if problem is None and policy is not None:
            address = host_address(urlsplit(url).hostname or "")
            reason = policy.refusal(address) if address is not None else None
            if reason:
                problem = f"address {show_address(address)} is not allowed ({reason})"
        if problem:
            errors.setdefault("inputs.url", []).append(problem)
        else:
            out["url"] = url

    for field, low, high, default in _INTEGERS:
        value = raw.get(field, default)
        if not _is_int(value) or not low <= value <= high:
            errors.setdefault(f"inputs.{field}", []).append(f"must be an integer from {low} to {high}")
        else:
            out[field] = value
    if errors:
        raise InvalidPackInputs(errors)
    return out


class UrlPack:
    pack_type = "url"
    version = "1.0.0"
    description = ("Fetch one http(s) URL and digest it: final URL, status, title, description, "
                   "text excerpt, links and the content's SHA-256. Private, loopback, link-local "
                   "and cloud metadata addresses are refused, on every redirect.")
    price = {"formula": "base_micros + per_kib_micros * ceil(bytes_read / 1024)", **PRICE}
    input_schema = INPUT_SCHEMA
    time_limit_sec = 30.0  # the fetch is bounded at TIMEOUT_SEC (15), the digest by its budget

    def __init__(self, fetcher: Fetcher, policy: AddressPolicy | None = None,
                 limits: FetchLimits = FetchLimits()):
        self.fetcher = fetcher
        self.policy = policy or AddressPolicy()
        self.limits = limits  # max_bytes comes from each run's inputs

    def validate(self, inputs: Any) -> dict[str, Any]:
        return _validate(inputs, self.policy)

    def min_price_micros(self, inputs: dict[str, Any]) -> int:
        return PRICE["base_micros"]

    def run(self, inputs: dict[str, Any], progress: Progress) -> PackResult:
        # Shape only: the addresses are judged by the fetcher, at connect time, by the
        # same policy (a literal refused here would be refused there too).
        inputs = _validate(inputs, policy=None)
        progress(0.0)
        limits = FetchLimits(
            max_bytes=inputs["max_bytes"],
            max_redirects=self.limits.max_redirects,
            timeout_sec=self.limits.timeout_sec,
            connect_timeout_sec=self.limits.connect_timeout_sec,
            read_timeout_sec=self.limits.read_timeout_sec,
        )
        fetched = self.fetcher.fetch(inputs["url"], limits, self.policy)
        progress(0.8)
        output = digest(inputs["url"], fetched, inputs["excerpt_chars"], inputs["max_links"])
        progress(1.0)
        return PackResult(output=output, actual_cost_micros=cost_micros(len(fetched.body)),
                          meta={"bytes": len(fetched.body), "truncated": fetched.truncated})


__all__ = [
    "PRICE", "AddressPolicy", "FetchLimits", "Fetched", "Fetcher", "PackFailed", "Target", "UrlBlocked",
    "UrlFetchFailed", "UrlPack", "blocked_reason", "cost_micros", "digest", "redirect_url", "request_target",
    "url_problem",
]
