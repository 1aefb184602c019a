"""The coordinator's SuperLink with its Control and Runtime APIs answering the coordinator host only.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (register node keys,
submit runs) and the Runtime API (the ServerApp process) on one HTTPS port. Node
authentication guards the Fleet API alone, so anyone who could reach the port and held
the public ``ca.crt`` could register a key of their own and submit a modified study.
This module runs Flower's own ``flower-superlink`` with one ASGI middleware in front of
its routes: a request for anything but the Fleet API and the health check is refused
(HTTP 403) unless it comes from the coordinator host itself — a loopback address listed
in ``control-from`` (default 127.0.0.1 and ::1), or the very address the connection
arrived on (the host reaching its own public address). Hospitals still reach
``/v1/fleet/…``; nobody else can register sites or submit studies.

Run as ``python -m server.superlink_guard [--control-from A,B] -- FLOWER-SUPERLINK-ARGS``;
``server.deploy.superlink_command`` builds that command.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
from typing import Any, Awaitable, Callable, Iterable, MutableMapping

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

#: What a hospital's SuperNode may use from anywhere: the Fleet API and the health check.
PUBLIC_PREFIXES = ("/v1/fleet/",)
PUBLIC_PATHS = ("/health", "/healthz")
DEFAULT_CONTROL_FROM = ("127.0.0.1", "::1")
log = logging.getLogger("medgan.superlink")


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return mapped or address


def is_public_path(path: str) -> bool:
    return path.startswith(PUBLIC_PREFIXES) or path in PUBLIC_PATHS


def is_coordinator_host(scope: Scope, control_from: Iterable[str]) -> bool:
    """Whether the connection comes from the coordinator host (see the module docstring)."""
    client, server = scope.get("client"), scope.get("server")
    if not client:
        return False
    client_ip = _ip(str(client[0]))
    if client_ip is None:
        return False
    if client_ip in {_ip(a) for a in control_from}:
        return True
    return bool(server) and client_ip == _ip(str(server[0]))


class CoordinatorOnlyMiddleware:
    """Pure ASGI middleware: refuse Control and Runtime API requests from other hosts."""

    def __init__(self, app: ASGIApp, control_from: Iterable[str] = DEFAULT_CONTROL_FROM) -> None:
        self.app = app
        self.control_from = tuple(control_from)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope.get("type") == "http" and not is_public_path(str(scope.get("path", ""))) \
                and not is_coordinator_host(scope, self.control_from):
            client = (scope.get("client") or ("?",))[0]
            log.warning("refused %s %s from %s: only the coordinator host may use this API",
                        scope.get("method"), scope.get("path"), client)
            body = json.dumps({"detail": "refused: only the coordinator host may register sites or submit "
                                         "studies (medgan server guard)"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def install(control_from: Iterable[str] = DEFAULT_CONTROL_FROM) -> None:
    """Put the middleware in front of every SuperLink route (outermost, before Flower's own)."""
    from starlette.middleware import Middleware

    from flwr.superlink import extensions

    original = extensions.get_middleware
    allowed = tuple(control_from)

    def with_guard() -> tuple[Middleware, ...]:
        return (Middleware(CoordinatorOnlyMiddleware, control_from=allowed), *original())

    extensions.get_middleware = with_guard  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    control_from = list(DEFAULT_CONTROL_FROM)
    if argv[:1] == ["--control-from"]:
        control_from = [a for a in argv[1].split(",") if a]
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install(control_from)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


if __name__ == "__main__":
    main()
