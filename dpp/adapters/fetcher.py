"""The `url` pack's HTTP client: connect only to the address that was checked.

Per hop: resolve the host once (`getaddrinfo`, or the literal address itself), ask
the pack's `AddressPolicy` about every address returned and refuse the hop if any is
refused, then open the TCP socket ourselves to one of those exact `sockaddr`s. For
https the socket is wrapped with the URL's host as TLS server name, so SNI and the
certificate check are for the name while the packet goes to the checked address.
`http.client` then speaks HTTP on that socket and is never allowed to connect (or
resolve) by itself. Redirects are never followed automatically: each Location is
re-validated, re-resolved and re-checked as a new hop, at most `max_redirects` times.

Why a watchdog thread: socket timeouts bound each `recv`, not a response, and a server
dripping one byte per second would hold a worker forever. At the deadline the watchdog
shuts the socket down (through a duplicate descriptor: shutdown acts on the connection,
so the blocked reader wakes up), and the fetch fails as timed out.

No proxies (nothing here reads HTTP_PROXY), no compression (`Accept-Encoding: identity`:
the byte cap is the bytes on the wire, and there is no decompression bomb), no cookies.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import Callable

from dpp.domain.packs.url import (
    REDIRECT_STATUSES,
    AddressPolicy,
    FetchLimits,
    Fetched,
    Target,
    UrlBlocked,
    UrlFetchFailed,
    redirect_url,
    request_target,
)

USER_AGENT = "DPP-url-pack/1.0 (+https://decisionproof.dev/packs/url)"
READ_CHUNK = 64 * 1024

AddrInfo = tuple[int, int, int, tuple]  # family, type, proto, sockaddr
Resolver = Callable[[str, int], list[tuple]]  # getaddrinfo-shaped


def getaddrinfo(host: str, port: int) -> list[tuple]:
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def bound(self, seconds: float) -> float:
        """`seconds`, cut to what is left (raising when nothing is)."""
        left = self.remaining()
        if left <= 0:
            raise self.expired()
        return min(seconds, left)

    def expired(self) -> UrlFetchFailed:
        return UrlFetchFailed(f"timed out after {self.seconds:g}s")


class _Watchdog:
    """Shuts the connection down at the deadline, whatever the reader is blocked on."""

    def __init__(self, sock: socket.socket, deadline: _Deadline):
        self.fired = threading.Event()
        self._twin = sock.dup()
        self._timer = threading.Timer(max(0.0, deadline.remaining()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        try:
            self._twin.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected yet, or already closed: the socket timeout ends it

    def close(self) -> None:
        self._timer.cancel()
        self._twin.close()


class _PinnedConnection(http.client.HTTPConnection):
    """http.client on a socket connected by us; it never resolves or connects itself."""

    def __init__(self, sock: socket.socket, timeout: float):
        super().__init__("pinned.invalid", timeout=timeout)
        self.sock = sock

    def connect(self) -> None:  # only reached if the socket was dropped
        raise http.client.HTTPException("pinned connection cannot reconnect")


class HttpFetcher:
    """The real `Fetcher` (see `dpp.domain.packs.url.Fetcher`).

    `resolve` (getaddrinfo-shaped) and `ssl_context` are injectable for tests.
    """

    def __init__(self, resolve: Resolver = getaddrinfo, ssl_context: ssl.SSLContext | None = None,
                 user_agent: str = USER_AGENT):
        self._resolve = resolve
        self._ssl_context = ssl_context
        self._user_agent = user_agent

    def fetch(self, url: str, limits: FetchLimits, policy: AddressPolicy) -> Fetched:
        deadline = _Deadline(limits.timeout_sec)
        redirects: list[str] = []
        target = request_target(url)
        while True:
            addresses = self._addresses(target, policy, deadline)
            status, location, content_type, body, truncated = self._exchange(target, addresses, limits, deadline)
            if status in REDIRECT_STATUSES and location is not None:
                if len(redirects) >= limits.max_redirects:
                    raise UrlFetchFailed(f"too many redirects (more than {limits.max_redirects})")
                next_url = redirect_url(target.url, location)
                try:
                    target = request_target(next_url)
                except UrlBlocked as exc:
                    raise UrlBlocked(f"redirect to a refused URL: {exc}") from None
                redirects.append(target.url)
                continue
            return Fetched(final_url=target.url, status=status, content_type=content_type,
                           body=body, truncated=truncated, redirects=tuple(redirects))

    # --- one hop ----------------------------------------------------------------------

    def _addresses(self, target: Target, policy: AddressPolicy, deadline: _Deadline) -> list[AddrInfo]:
        """Every address the host has, each checked; the hop is refused if any is refused."""
        if target.address is not None:
            ip = target.address
            infos = [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM,
                      socket.IPPROTO_TCP, "", (str(ip), target.port))]
        else:
            infos = self._resolve_in_time(target.host, target.port, deadline)
        checked: list[AddrInfo] = []
        for family, socktype, proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(sockaddr[0])
            reason = policy.refusal(ip)
            if reason:
                if target.address is not None:
                    raise UrlBlocked(f"address {target.host} is not allowed ({reason})")
                # The resolved address stays out of the message: it is our network's
                # DNS answer, not something the caller should learn from us.
                raise UrlBlocked(f"{target.host} resolves to an address that is not allowed ({reason})")
            if (family, socktype, proto, sockaddr) not in checked:
                checked.append((family, socktype, proto, sockaddr))
        if not checked:
            raise UrlFetchFailed(f"{target.host} has no address")
        return checked

    def _resolve_in_time(self, host: str, port: int, deadline: _Deadline) -> list[tuple]:
        # getaddrinfo cannot be interrupted; wait for it in a thread up to the deadline.
        result: dict[str, object] = {}

        def work() -> None:
            try:
                result["infos"] = self._resolve(host, port)
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        thread = threading.Thread(target=work, name="dpp-url-resolve", daemon=True)
        thread.start()
        thread.join(deadline.bound(deadline.seconds))
        if thread.is_alive():
            raise deadline.expired()
        if "error" in result:
            raise UrlFetchFailed(f"could not resolve {host}")
        return list(result["infos"])  # type: ignore[arg-type]

    def _connect(self, target: Target, addresses: list[AddrInfo], limits: FetchLimits,
                 deadline: _Deadline) -> tuple[socket.socket, _Watchdog]:
        error: Exception | None = None
        for family, socktype, proto, sockaddr in addresses:
            sock = socket.socket(family, socktype, proto)
            watchdog = _Watchdog(sock, deadline)
            try:
                sock.settimeout(deadline.bound(limits.connect_timeout_sec))
                sock.connect(sockaddr)
                if target.scheme == "https":
                    sock.settimeout(deadline.bound(limits.read_timeout_sec))
                    sock = self._tls().wrap_socket(sock, server_hostname=target.host)
                sock.settimeout(deadline.bound(limits.read_timeout_sec))
                return sock, watchdog
            except (OSError, UrlFetchFailed) as exc:  # UrlFetchFailed: the deadline, from bound()
                sock.close()
                watchdog.close()
                if watchdog.fired.is_set() or deadline.remaining() <= 0:
                    raise deadline.expired() from None
                if isinstance(exc, ssl.SSLError):  # a certificate or protocol problem: no other address helps
                    why = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
                    raise UrlFetchFailed(f"TLS with {target.host} failed: {why}") from None
                error = exc
        if isinstance(error, TimeoutError):
            raise UrlFetchFailed(f"connecting to {target.host} timed out")
        raise UrlFetchFailed(f"could not connect to {target.host}: {getattr(error, 'strerror', None) or error}")

    def _exchange(self, target: Target, addresses: list[AddrInfo], limits: FetchLimits, deadline: _Deadline):
        """(status, Location or None, Content-Type, body, truncated); a redirect's body is not read."""
        sock, watchdog = self._connect(target, addresses, limits, deadline)
        conn = _PinnedConnection(sock, timeout=limits.read_timeout_sec)
        try:
            conn.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", target.host_header)
            conn.putheader("User-Agent", self._user_agent)
            conn.putheader("Accept", "text/html, text/plain;q=0.9, */*;q=0.1")
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("Connection", "close")
            conn.endheaders()
            response = conn.getresponse()
            location = response.getheader("Location")
            content_type = response.getheader("Content-Type")
            if response.status in REDIRECT_STATUSES and location is not None:
                body, truncated = b"", False
            else:
                body, truncated = _read_capped(response, limits.max_bytes)
            if watchdog.fired.is_set():  # the shutdown can look like a clean end of body
                raise deadline.expired()
            return response.status, location, content_type, body, truncated
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.fired.is_set() or deadline.remaining() <= 0:
                raise deadline.expired() from None
            if isinstance(exc, TimeoutError):
                raise UrlFetchFailed(f"{target.host} did not answer within {limits.read_timeout_sec:g}s") from None
            raise UrlFetchFailed(f"HTTP exchange with {target.host} failed: {type(exc).__name__}") from None
        finally:
            conn.close()
            watchdog.close()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            try:
                import certifi

                self._ssl_context = ssl.create_default_context(cafile=certifi.where())
            except ImportError:
                self._ssl_context = ssl.create_default_context()
        return self._ssl_context


def _read_capped(response: http.client.HTTPResponse, max_bytes: int) -> tuple[bytes, bool]:
    """At most `max_bytes` of the body, and whether there was more."""
    parts: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = response.read1(min(READ_CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    body = b"".join(parts)
    return body[:max_bytes], size > max_bytes


__all__ = ["HttpFetcher", "USER_AGENT", "getaddrinfo"]
