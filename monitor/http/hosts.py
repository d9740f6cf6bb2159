"""Only the names the sidecar is reached by: other ``Host`` headers get a 421 (docs/operations.md, "Exposure").

DNS rebinding: a page on ``http://evil.example:9464`` whose name its owner then points at 127.0.0.1 is, to
the browser, on the same origin as a sidecar listening there, so its script can read ``/v1/runs``,
``/v1/alerts``, the page and ``/metrics`` (cross_site.py guards writes only; reads need no token on
loopback). Its requests carry ``Host: evil.example:9464``: a name the sidecar never goes by. Allowed, on
any port:

- ``localhost``, and any IP address (``127.0.0.1``, ``[::1]``, a pod or node address Prometheus scrapes):
  a page can only send an address as its Host when it was itself served from that address and port;
- the machine's own name (``socket.gethostname()``, and its first label), as ``{master}`` URLs and Slurm
  give it, and the name ``server.host`` binds;
- ``server.allowed_hosts``: names such as a Compose service or a proxy's, ``*.example.com`` for a
  domain's names, ``"*"`` for any (the check off).

A request with no Host (HTTP/1.0) is not from a browser and passes. A pure ASGI middleware, outermost: every
route, present and future, is covered, ``/healthz`` too (a probe by a name not allowed fails as loudly as
the scrape would).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Awaitable, Callable, Iterable

from .strict_text import ASGIApp, send_error

ANY = "*"


def host_name(header: str) -> str:
    """The name in a Host header, without its port, lower case, without a trailing dot: ``[::1]:9464``
    -> ``::1``, ``Evil.Example.:80`` -> ``evil.example``."""
    text = header.strip().lower()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostNames:
    """The names allowed (the module doc); ``allows(name)`` for a name from ``host_name``."""

    def __init__(self, configured: Iterable[str], bound: str, machine: str | None = None) -> None:
        configured = [n.strip().lower().rstrip(".") for n in configured]
        self.any = ANY in configured
        self.suffixes = tuple(n[1:] for n in configured if n.startswith("*."))  # ".example.com"
        machine = (machine if machine is not None else socket.gethostname()).lower().rstrip(".")
        self.names = {"localhost", host_name(bound), machine, machine.split(".")[0]}
        self.names.update(n for n in configured if not n.startswith("*"))
        self.names.discard("")

    def allows(self, name: str) -> bool:
        return (self.any or name in self.names or is_address(name)
                or (bool(self.suffixes) and name.endswith(self.suffixes)))


def refusal(header: str) -> str:
    """The 421's error: what to set first (a client log line shows the first 200 characters), then why."""
    name = host_name(header)[:100]
    return (f"Host {header[:100]!r}: not a name of this sidecar; to reach it as {name!r}, add that to "
            f"server.allowed_hosts (--allowed-host {name}, TRAINHEALTH_ALLOWED_HOSTS; [\"*\"]: any name). Refused "
            f"because a web page whose name was pointed at this address (DNS rebinding) sends such requests "
            f"(docs/operations.md, \"Exposure\")")


class AllowedHosts:
    def __init__(self, app: ASGIApp, names: HostNames) -> None:
        self.app = app
        self.hosts = names

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http" and not self.hosts.any:
            header = next((v for k, v in scope.get("headers", []) if k.lower() == b"host"), None)
            if header is not None:
                text = header.decode("latin-1")
                if not self.hosts.allows(host_name(text)):
                    await send_error(send, 421, refusal(text))
                    return
        await self.app(scope, receive, send)
