"""TLS, mutual TLS, bearer tokens, health, reflection and metrics of a shard."""
from __future__ import annotations

import datetime
import ipaddress
import threading
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from optserve import RemoteAdam
from optserve.client.transport import RetryPolicy, Security, ShardClient, ShardError
from optserve.frames import AUTH, HEADER, MAGIC
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing
from optserve.server import main as server_main
from optserve.server.main import ServerConfig, Shard, run_server

TOKEN = "s3cret-token"


# -- certificates made here ---------------------------------------------------------------------

def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer=None, issuer_key=None, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


class CA:
    def __init__(self, name: str):
        self.key = _key()
        self.cert = _cert(name, self.key, ca=True)

    def issue(self, subject: str, server: bool = False) -> tuple[bytes, bytes]:
        key = _key()
        return _pem(_cert(subject, key, self.cert, self.key, server=server)), _pem(key)

    @property
    def pem(self) -> bytes:
        return _pem(self.cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA("optserve test CA"), CA("another CA")
    files = {}
    for name, (cert, key) in {"server": ca.issue("shard", server=True), "client": ca.issue("worker"),
                              "stranger": other.issue("stranger")}.items():
        (d / f"{name}.pem").write_bytes(cert)
        (d / f"{name}.key").write_bytes(key)
        files[name] = (cert, key)
    (d / "ca.pem").write_bytes(ca.pem)
    return d, ca, files


def train_once(address: str, **security) -> int:
    model = nn.Linear(3, 2)
    # A refused handshake looks like a shard still starting (UNAVAILABLE): a short connect_timeout
    # makes the refusal surface quickly.
    with RemoteAdam(model.named_parameters(), [address], retry_budget=0, connect_timeout=1, **security) as opt:
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        return opt.versions["weight"]


# -- TLS ---------------------------------------------------------------------------------------

def test_tls_round_trip_with_a_generated_ca(pki):
    d, ca, _ = pki
    with run_server(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key")) as address:
        assert train_once(address, root_certificates=ca.pem) == 1


@pytest.mark.parametrize("mutual", [False, True])
def test_tensors_travel_over_the_tls_data_channel_and_plaintext_is_refused_there(pki, mutual):
    d, ca, files = pki
    extra = dict(tls_client_ca=str(d / "ca.pem")) if mutual else {}
    client = dict(certificate_chain=files["client"][0], private_key=files["client"][1]) if mutual else {}
    shard = Shard(ServerConfig(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"), **extra))
    shard.start()
    try:
        assert train_once(shard.address, root_certificates=ca.pem, **client) == 1
        plain = socket.create_connection(("127.0.0.1", shard.data.port), timeout=10)
        plain.sendall(HEADER.pack(MAGIC, AUTH, 0, 0))  # a plaintext AUTH frame is no TLS hello
        try:
            answer = plain.recv(64)  # the handshake fails: a TLS alert, or the connection reset
        except ConnectionResetError:
            answer = b""
        plain.close()
    finally:
        shard.stop()

    assert shard.core.counters.data_calls == 2  # the pull after registration, the step's PushPull
    assert MAGIC not in answer  # nothing of the protocol answers a plaintext peer


def test_a_plaintext_client_cannot_talk_to_a_tls_shard(pki):
    d, _, _ = pki
    with run_server(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key")) as address:
        with pytest.raises(ShardError):
            train_once(address)


def test_mutual_tls_accepts_a_client_certificate_signed_by_its_ca(pki):
    d, ca, files = pki
    cert, key = files["client"]
    with run_server(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                    tls_client_ca=str(d / "ca.pem")) as address:
        assert train_once(address, root_certificates=ca.pem, certificate_chain=cert, private_key=key) == 1


def test_mutual_tls_files_can_come_from_the_environment(pki, monkeypatch):
    d, _, _ = pki
    monkeypatch.setenv("OPTSERVE_TLS_CA", str(d / "ca.pem"))
    monkeypatch.setenv("OPTSERVE_TLS_CERT", str(d / "client.pem"))
    monkeypatch.setenv("OPTSERVE_TLS_KEY", str(d / "client.key"))
    with run_server(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                    tls_client_ca=str(d / "ca.pem")) as address:
        assert train_once(address) == 1


@pytest.mark.parametrize("client", [None, "stranger"])
def test_mutual_tls_refuses_a_client_without_a_certificate_or_signed_by_another_ca(pki, client):
    d, ca, files = pki
    extra = {} if client is None else dict(certificate_chain=files[client][0], private_key=files[client][1])
    with run_server(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                    tls_client_ca=str(d / "ca.pem")) as address:
        with pytest.raises(ShardError) as err:
            train_once(address, root_certificates=ca.pem, **extra)

    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_on_a_public_address_needs_insecure():
    with pytest.raises(ValueError, match="--insecure"):
        ServerConfig(host="0.0.0.0")

    assert ServerConfig(host="0.0.0.0", insecure=True).insecure


# -- tokens ------------------------------------------------------------------------------------

@pytest.fixture
def token_shard(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with run_server(token_file=str(token_file)) as address:
        yield address


CALLS = {  # every OptServe method, with a request that would otherwise be answered
    "Hello": lambda c: c.hello(),
    "Stats": lambda c: c.stats(),
    "Checkpoint": lambda c: c.checkpoint(),
    "Register": lambda c: c.register(pb.RegisterHead(keys=[pb.KeySpec(name="w", shape=[2], dtype=pb.FLOAT32)],
                                                     num_shards=1)),
    "Push": lambda c: c.push(pb.PushHead(entries=[pb.PushEntry(key="w")]), [], torch.float32),
    "PushPull": lambda c: c.push_pull(pb.PushHead(), [], torch.float32, lambda h: {}),
    "Pull": lambda c: c.pull(pb.PullRequest(keys=["w"]), lambda h: {}),
    "SetState": lambda c: c.set_state(pb.SetStateHead(), []),
}


@pytest.mark.parametrize("token", [None, "wrong-token"])
@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_method_without_the_right_token_is_unauthenticated(token_shard, method, token):
    client = ShardClient(token_shard, security=Security(token=token))

    with pytest.raises(ShardError) as err:
        CALLS[method](client)

    client.close()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_without_a_token(token_shard):
    client = ShardClient(token_shard, security=Security())

    assert client.health() == "SERVING"
    client.close()


def test_the_right_token_works(token_shard):
    assert train_once(token_shard, token=TOKEN) == 1


def test_the_token_can_come_from_the_environment(token_shard, monkeypatch):
    monkeypatch.setenv("OPTSERVE_TOKEN", TOKEN)

    assert train_once(token_shard) == 1


def test_the_token_can_come_from_a_file_the_environment_names(token_shard, monkeypatch, tmp_path):
    """A Swarm or compose secret is a file (/run/secrets/...): RemoteAdam(token=None) reads it."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.delenv("OPTSERVE_TOKEN", raising=False)
    monkeypatch.setenv("OPTSERVE_TOKEN_FILE", str(tmp_path / "token"))

    assert train_once(token_shard) == 1


# -- health, reflection, metrics ---------------------------------------------------------------

_PROBE = """import sys
from optserve.cli import main
rc = main(sys.argv[1:])
print("torch imported:", sorted(m for m in sys.modules if m == "torch" or m.startswith("optserve.server.")))
sys.exit(rc)
"""


def _probe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, "--log-level", "WARNING", "health", *argv],
                          capture_output=True, text=True, timeout=120)


def test_the_health_probe_imports_neither_torch_nor_the_server_and_speaks_tls(pki):
    d, _, _ = pki
    with run_server(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key")) as address:
        served = _probe(address, "--tls-ca", str(d / "ca.pem"))
        plaintext = _probe(address, "--timeout", "2")  # a plaintext probe of a TLS shard
    gone = _probe(address, "--timeout", "2")

    assert served.returncode == 0, served.stderr
    assert f"{address}: SERVING" in served.stdout
    assert "torch imported: []" in served.stdout  # what an orchestrator's 5 s health check must not pay
    assert plaintext.returncode == 1 and "unreachable" in plaintext.stdout
    assert gone.returncode == 1 and "unreachable (UNAVAILABLE" in gone.stdout


def test_health_is_not_serving_while_a_checkpoint_is_restored_and_serving_after(tmp_path, monkeypatch):
    release, restoring = threading.Event(), threading.Event()
    real_restore = server_main.Checkpointer.restore

    def slow_restore(self):
        restoring.set()
        release.wait(timeout=30)
        return real_restore(self)

    monkeypatch.setattr(server_main.Checkpointer, "restore", slow_restore)
    shard = Shard(ServerConfig(checkpoint_dir=str(tmp_path)))
    starter = threading.Thread(target=shard.start)
    starter.start()
    try:
        assert restoring.wait(timeout=30)
        channel = grpc.insecure_channel(shard.address)
        check = health_pb2_grpc.HealthStub(channel).Check
        during = check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/optserve.v1.OptServe/Hello")(b"", timeout=10)
        release.set()
        starter.join(timeout=30)
        after = check(health_pb2.HealthCheckRequest(service="optserve.v1.OptServe"), timeout=10).status
        channel.close()
    finally:
        release.set()
        starter.join(timeout=30)
        shard.stop()

    assert during == health_pb2.HealthCheckResponse.NOT_SERVING
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert after == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(shard):
    channel = grpc.insecure_channel(shard)

    services = ProtoReflectionDescriptorDatabase(channel).get_services()

    channel.close()
    assert "optserve.v1.OptServe" in services and "grpc.health.v1.Health" in services


def test_metrics_after_n_pushes_show_the_counters_and_a_staleness_histogram():
    shard = Shard(ServerConfig(metrics_port=0))
    shard.start()
    try:
        model = nn.Linear(3, 2)
        with RemoteAdam(model.named_parameters(), [shard.address]) as opt:
            for _ in range(5):
                opt.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                opt.step()
        text = urllib.request.urlopen(f"http://127.0.0.1:{shard.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        shard.stop()

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("optserve_pushes_total", ())] == 5
    assert samples[("optserve_keys", ())] == 2
    assert samples[("optserve_parameters", ())] == 8
    assert samples[("optserve_staleness_count", ())] == 5  # one per push (of two keys each)
    assert samples[("optserve_staleness_bucket", (("le", "0"),))] == 5
    assert samples[("optserve_update_seconds_count", ())] == 5
    assert samples[("optserve_received_bytes_total", ())] > 0


def test_refusals_are_counted_by_code(shard):
    client = ShardClient(shard)
    with pytest.raises(ShardError):
        client.pull(pb.PullRequest(keys=["missing"]), lambda h: {})

    stats = client.stats()
    client.close()
    assert stats.rejected == 1


def test_a_shard_over_its_key_limit_is_resource_exhausted():
    with run_server(max_keys=1) as address:
        with pytest.raises(ShardError) as err:
            RemoteAdam(nn.Linear(3, 2).named_parameters(), [address])

    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def _tls_shard(d, **options) -> Shard:
    shard = Shard(ServerConfig(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"), **options))
    shard.start()
    return shard


def _push(client: ShardClient, seq: int) -> pb.PushReply:
    head = pb.PushHead(client_id="tls-worker", seq=seq, wire_dtype=pb.FLOAT32, hyper=[pb.HyperParams(
        lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)], entries=[pb.PushEntry(key="w", version_read=seq - 1)])
    return client.push(head, [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)


def test_stopping_a_tls_shard_closes_its_data_connections(pki):
    d, ca, _ = pki
    shard = _tls_shard(d)
    client = ShardClient(shard.address, security=Security(tls=True, root_certificates=ca.pem))
    client.register(pb.RegisterHead(keys=[pb.KeySpec(name="w", shape=[8], dtype=pb.FLOAT32)], num_shards=1,
                                    with_values=True), [Outgoing(0, pb.PARAM, torch.zeros(8))])
    _push(client, 1)  # leaves a TLS connection open in the client's pool
    assert len(shard.data._conns) == 1

    shard.stop(grace=0.2)

    deadline = time.monotonic() + 5
    while shard.data._conns and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close()
    assert not shard.data._conns  # its thread saw the shutdown: no reply can leave after stop()


def test_a_tls_worker_retries_across_a_shard_restart(pki, tmp_path):
    d, ca, _ = pki
    first = _tls_shard(d, checkpoint_dir=str(tmp_path))
    client = ShardClient(first.address, security=Security(tls=True, root_certificates=ca.pem),
                         retry=RetryPolicy(budget=20))
    client.register(pb.RegisterHead(keys=[pb.KeySpec(name="w", shape=[8], dtype=pb.FLOAT32)], num_shards=1,
                                    with_values=True), [Outgoing(0, pb.PARAM, torch.zeros(8))])
    assert list(_push(client, 1).versions) == [1]
    port, data_port = first.port, first.data.port
    first.stop(grace=1, final_checkpoint=True)
    second = _tls_shard(d, checkpoint_dir=str(tmp_path), port=port, data_port=data_port)
    try:
        reply = _push(client, 2)  # the pooled connection is dead: broken, retried, reconnected
    finally:
        client.close()
        second.stop()

    assert list(reply.versions) == [2] and not reply.duplicate
    assert second.core.counters.data_calls == 1
