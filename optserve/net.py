"""Names both ends of a connection agree on: the token's environment variable and file, the bearer
header, and which hosts are this machine's own (loopback). Standard library only: the light health
probe (client/probe.py) imports it.
"""
from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "OPTSERVE_TOKEN"  # the token itself: a shard's (else --token-file), a worker's (else token=)
TOKEN_FILE_ENV = "OPTSERVE_TOKEN_FILE"  # else a file holding it (a mounted Swarm or compose secret)
AUTHORIZATION = "authorization"  # gRPC metadata key of the bearer token


def bearer(token: str) -> str:
    """The `authorization` value that carries `token`."""
    return f"Bearer {token}"


def is_loopback(host: str) -> bool:
    """A loopback host: "localhost", 127.x.y.z, ::1 (bracketed or not), or 127.0.0.1 mapped into IPv6.
    A shard serves plaintext there by default (server/main.py), and the data channel sizes its socket
    buffers for it (optserve/frames.py `tune`)."""
    host = host.strip("[]")
    return host in ("localhost", "::1", "::ffff:127.0.0.1") or host.startswith("127.")


def load_token(token_file: str | None = None) -> str:
    """The token, for a shard, a client command and RemoteAdam alike: from `token_file` if given,
    else OPTSERVE_TOKEN, else the file OPTSERVE_TOKEN_FILE names, else "" (no token). A file that
    cannot be read or is empty is a ValueError."""
    if not token_file and not os.environ.get(TOKEN_ENV, "").strip():
        token_file = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"token file {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip()
