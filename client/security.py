"""How a client reaches shards: TLS, mutual TLS and the bearer token. grpc only, no torch: the light
health probe (client/probe.py) uses it as RemoteAdam and the other commands do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from optserve.net import AUTHORIZATION, bearer, load_token

TLS_CA_ENV = "OPTSERVE_TLS_CA"
TLS_CERT_ENV = "OPTSERVE_TLS_CERT"
TLS_KEY_ENV = "OPTSERVE_TLS_KEY"


@dataclass(frozen=True)
class Security:
    """How a worker reaches shards: TLS (optionally with a client certificate) and a bearer token.

    `from_env` fills what was not given from OPTSERVE_TOKEN (else the file OPTSERVE_TOKEN_FILE names),
    OPTSERVE_TLS_CA (a PEM file path) and, for mutual TLS, OPTSERVE_TLS_CERT and OPTSERVE_TLS_KEY (PEM
    file paths).
    """
    tls: bool = False
    root_certificates: bytes | None = None  # PEM CA; None: the system's roots
    certificate_chain: bytes | None = None  # mutual TLS: this client's certificate (PEM)
    private_key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_env(cls, tls: bool = False, root_certificates: bytes | None = None,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None,
                 token: str | None = None) -> "Security":
        def from_file(value: bytes | None, env: str) -> bytes | None:
            path = os.environ.get(env)
            return Path(path).read_bytes() if value is None and path else value

        root_certificates = from_file(root_certificates, TLS_CA_ENV)
        certificate_chain = from_file(certificate_chain, TLS_CERT_ENV)
        private_key = from_file(private_key, TLS_KEY_ENV)
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("a client certificate needs both certificate_chain and private_key")
        return cls(tls=tls or root_certificates is not None or certificate_chain is not None,
                   root_certificates=root_certificates, certificate_chain=certificate_chain,
                   private_key=private_key, token=token or load_token() or None)

    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.Channel:
        """The one place channels are made."""
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        creds = grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)
        return grpc.secure_channel(address, creds, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, bearer(self.token)),) if self.token else ()
