"""A simulated site trains only where Ray, Flower's simulation engine, is on loopback.

Ray opens its GCS, raylet and worker gRPC servers on ``0.0.0.0`` unless the node's
address is loopback, and on Linux it picks the machine's routable address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read once, when Ray is imported) makes it take
127.0.0.1. Every simulated site runs inside a Ray worker, so checking there covers every
way a simulation starts (``medgan demo``, ``simulate_federation``, ``flwr run``): a site
whose Ray can be reached from the network refuses to touch its images, unless that Ray
asks every caller for its token (``RAY_AUTH_MODE=token``) over TLS (``RAY_USE_TLS=1``): a
cluster of several machines, set up as the README says.
"""

from __future__ import annotations

import ipaddress
import os
import sys

#: The setting that keeps Ray on 127.0.0.1 (it must be in the environment before Ray is imported).
LOOPBACK_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def keep_ray_on_loopback() -> None:
    """Make the Ray that a simulation starts here listen on 127.0.0.1 only, it and its workers."""
    name, value = LOOPBACK_ENV
    os.environ[name] = value  # Ray's raylet and workers inherit it
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray already imported: it read the setting then
        constants.ENABLE_RAY_CLUSTER = False


def ray_exposure() -> str:
    """Why this process may not handle a site's images ('' when it may): it runs in a Ray whose
    node address is not loopback, so Ray's servers listen on every interface."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""  # a deployed SuperNode: no Ray
    address = ray.util.get_node_ip_address()
    try:
        if ipaddress.ip_address(address).is_loopback:
            return ""
    except ValueError:
        pass
    if token_authenticated() and tls_encrypted():
        return ""
    name, value = LOOPBACK_ENV
    return (f"this simulated site refuses to train: the simulation's Ray listens on {address} and every other "
            f"interface, so others on the network could reach it; start it with {name}={value} in the environment "
            "(medgan demo, simulate_federation and flwr run of this app do), or, for a cluster of several "
            "machines, with RAY_AUTH_MODE=token and RAY_USE_TLS=1 on every node")


def token_authenticated() -> bool:
    """Ray refuses callers without the cluster's token (Ray >= 2.52; read from the running Ray)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # an older Ray: no token authentication
        return False
    return bool(is_token_auth_enabled())


def tls_encrypted() -> bool:
    """Ray's gRPC channels use TLS (the setting Ray's own processes read, inherited by its workers)."""
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true")
