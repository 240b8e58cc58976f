"""Who may call a shard: bearer tokens (an interceptor) and TLS credentials (built once, here).

The token comes from a file or the OPTSERVE_TOKEN environment variable, never from the command line
(where `ps` would show it). The interceptor compares in constant time and answers UNAUTHENTICATED
before any handler runs or any request byte is read; the health service stays open so orchestrators
can probe without the secret. No request handling lives here.
"""
from __future__ import annotations

import hmac
import ssl
from pathlib import Path

import grpc

from optserve.net import AUTHORIZATION, bearer

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health checks unless it carries `authorization: Bearer <token>`."""

    def __init__(self, token: str, on_refused=None):
        self._expected = bearer(token).encode()
        self._on_refused = on_refused  # called with the method name: counts refusals in metrics

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_PREFIXES):
            return continuation(details)
        given = next((v for k, v in (details.invocation_metadata or ()) if k == AUTHORIZATION), "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return continuation(details)
        # The token is checked before the method is looked up: an unknown method answers
        # UNAUTHENTICATED like a known one, so without the token nothing about the service can be probed.
        handler = continuation(details)
        if self._on_refused is not None:
            self._on_refused(details.method)
        message = "missing bearer token" if not given else "wrong bearer token"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # Same streaming shape as the real method (an unknown one: a stream), so grpc never reads the
        # request stream.
        if handler is None or handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    """TLS for the shard; with a client CA, mutual TLS (clients must present a certificate it signed)."""
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """The same TLS (and mutual TLS) for the data channel (server/data.py) as for gRPC."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca_file)
    return ctx

