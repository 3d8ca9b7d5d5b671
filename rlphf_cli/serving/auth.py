"""API keys for `rlphf serve`, as vLLM's and OpenAI's servers take them: `Authorization: Bearer KEY`.

Keys come from --api-key (repeatable) and RLPHF_API_KEY (comma-separated). A presented key is
compared with every configured key through their SHA-256 digests with hmac.compare_digest: the
time taken tells neither which key nor how much of one matched. A key is known to the rest of the
server only by its position ("key 2"): logs, metrics and errors never hold a key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Mapping, Sequence

from rlphf_cli.errors import InputError

ENV_VAR = "RLPHF_API_KEY"


def api_keys(given: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The configured keys: --api-key values, then RLPHF_API_KEY's comma-separated ones."""
    import os

    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in given] + [k.strip() for k in environ.get(ENV_VAR, "").split(",")]
    for key in keys:
        if any(c.isspace() for c in key):
            raise InputError(f"--api-key / {ENV_VAR}: a key must not contain whitespace")
    return tuple(dict.fromkeys(k for k in keys if k))


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is only reachable from this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(host: str, keys: Sequence[str], no_auth: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless --no-auth says so on purpose."""
    if keys and no_auth:
        raise InputError("--no-auth with --api-key (or RLPHF_API_KEY): choose one")
    if not keys and not no_auth and not is_loopback(host):
        raise InputError(f"--host {host}: reachable from other machines without an API key; give --api-key KEY "
                         f"(or set {ENV_VAR}), or --no-auth to serve anyone who reaches the port")


class KeyChecker:
    """Which configured key (1-based) an Authorization header carries; None when none does."""

    def __init__(self, keys: Sequence[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: str | None) -> int | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for number, digest in enumerate(self._digests, 1):  # no early exit: every key is compared
            if hmac.compare_digest(presented, digest):
                found = number
        return found
