"""docker/stack.yaml agrees with itself and with the code, without docker (`make swarm-test` runs it on
a swarm): no start-order conditions (Swarm rejects them), dnsrr endpoints everywhere (no IPVS here),
one service and one volume per shard index, the shard index and the workers' server list derived as
client/discovery.py derives them, probes on the serving port, the token where the flags point."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from optserve.client.discovery import servers_from_env, shard_index_from_env

ROOT = Path(__file__).resolve().parents[2]
STACK = yaml.safe_load((ROOT / "docker" / "stack.yaml").read_text())
SERVICES = STACK["services"]
SHARDS = sorted(name for name in SERVICES if name.startswith("shard-"))
WORKERS = sorted(name for name in SERVICES if name.startswith("worker-"))
IMAGE_UID = re.search(r"ARG UID=(\d+)", (ROOT / "docker" / "Dockerfile").read_text())[1]


def flags(args: list[str]) -> dict[str, str | None]:
    out, i = {}, 0
    while i < len(args):
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        out[args[i][2:]] = value
        i += 2 if value is not None else 1
    return out


def secret_path(service: dict) -> str:
    [secret] = service["secrets"]
    assert secret["source"] in STACK["secrets"]
    assert secret["uid"] == IMAGE_UID and secret["mode"] == 0o400  # readable by the image's user only
    return f"/run/secrets/{secret['target']}"


def test_two_shards_and_two_workers_each_service_on_dnsrr_and_no_start_order():
    assert SHARDS == ["shard-0", "shard-1"] and WORKERS == ["worker-0", "worker-1"]
    for name, service in SERVICES.items():
        assert service["deploy"]["endpoint_mode"] == "dnsrr", name  # a virtual IP needs IPVS
        assert "depends_on" not in service, name  # Swarm has no start order: workers wait


@pytest.mark.parametrize("name", SHARDS)
def test_a_shard_finds_its_index_and_keeps_its_checkpoints_on_its_own_volume(name):
    shard = SERVICES[name]
    f = flags(shard["command"])
    index = int(name.split("-")[1])
    # --shard-index auto reads the host name Swarm gives the task: "<stack>_shard-<i>"
    assert f["shard-index"] == "auto" and shard["hostname"] == "{{.Service.Name}}"
    assert shard_index_from_env({}, hostname=f"optserve_{name}") == index
    assert f["num-shards"] == str(len(SHARDS))
    [mount] = shard["volumes"]
    volume, target = mount.split(":")
    assert target == f["checkpoint-dir"] and volume in STACK["volumes"] and volume.startswith(name)
    assert f["token-file"] == secret_path(shard)
    assert f["host"] == "0.0.0.0" and "insecure" in f  # plaintext off loopback needs --insecure
    assert shard["deploy"]["restart_policy"]["condition"] == "any"
    assert shard["deploy"]["replicas"] == 1
    probe = shard["healthcheck"]["test"][-1]
    assert re.search(rf"optserve .*health localhost:{f['port']}\b", probe), probe  # the light probe


def test_the_shards_use_distinct_volumes():
    volumes = [SERVICES[name]["volumes"][0].split(":")[0] for name in SHARDS]
    assert len(set(volumes)) == len(SHARDS)


@pytest.mark.parametrize("name", WORKERS)
def test_a_worker_lists_every_shard_by_service_name_in_index_order(name):
    worker = SERVICES[name]
    env = {k: str(v) for k, v in worker["environment"].items()}
    ports = {flags(SERVICES[s]["command"])["port"] for s in SHARDS}
    [port] = ports
    assert servers_from_env(env) == [f"{s}:{port}" for s in SHARDS]
    assert env["OPTSERVE_TOKEN_FILE"] == secret_path(worker)  # RemoteAdam reads it (optserve/net.py)
    assert env["WORKER_INDEX"] == name.split("-")[1] and env["NUM_WORKERS"] == str(len(WORKERS))
    assert worker["deploy"]["restart_policy"]["condition"] == "none"  # runs once: a restart trains anew
    assert worker["entrypoint"][-1] == "/usr/local/share/optserve/worker.py"
