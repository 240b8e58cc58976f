"""deploy/k8s without a cluster: `kubectl kustomize` renders every overlay, the result is checked
against the Kubernetes schema offline (kubernetes-validate ships the schemas), the properties that
matter are asserted, and then the rendered shard and worker commands run as processes, each pod in
a network namespace of its own (its own address on a bridge in a "node" namespace, the pod's host
name in a UTS namespace, a hosts file that maps the StatefulSet's names as cluster DNS would). One
shard is stopped as the kubelet stops a pod (SIGTERM) and comes back at another address under its
name, on its volume; the workers follow it and every key's step equals the pushes applied.

Needs kubectl (with kustomize), root and iproute2, as CI has; a missing kubectl fails, naming it.
Addresses are 10.244.0.0/24 inside namespaces this test makes and deletes; no host interface or
route is touched.
"""
from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("plaintext", "tls", "token", "cuda")
# SIGTERM: serve() lets calls in flight finish for 5 s, then writes the final checkpoint; the grace
# period must leave room for that checkpoint on a slow volume.
MIN_GRACE_SECONDS = 60
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@functools.lru_cache(maxsize=None)
def _rendered(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/k8s; install kubectl")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _one(overlay: str, kind: str) -> dict:
    docs = [d for d in _rendered(overlay) if d["kind"] == kind]
    assert len(docs) == 1, (overlay, kind, [d["kind"] for d in _rendered(overlay)])
    return copy.deepcopy(docs[0])


def _flags(args: list[str]) -> dict[str, str | None]:
    """--name=value and --name value as {name: value}; a bare flag maps to None."""
    flags, i = {}, 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), args
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            name, value = arg[2:], args[i + 1]
            i += 1
        else:
            name, value = arg[2:], None
        assert name not in flags, f"--{name} given twice in {args}"
        flags[name] = value
        i += 1
    return flags


def _shard(overlay: str) -> tuple[dict, dict, dict]:
    sts = _one(overlay, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return sts, container, _flags(container["args"])


def _worker(overlay: str) -> tuple[dict, dict, dict]:
    job = _one(overlay, "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    return job, container, env


def _mount_of(container: dict, path: str) -> dict:
    mounts = [m for m in container.get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    return mounts[0]


def _volume(pod_spec: dict, name: str) -> dict:
    (volume,) = [v for v in pod_spec.get("volumes", []) if v["name"] == name]
    return volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_is_valid_against_the_kubernetes_schema(overlay):
    from kubernetes_validate import utils
    docs = _rendered(overlay)
    assert sorted(d["kind"] for d in docs) == ["Job", "PodDisruptionBudget", "Service", "StatefulSet"]
    for doc in docs:  # strict: an unknown field (a typo) is an error, as the API server's would be
        utils.validate(doc, utils.latest_version(), strict=True)


def test_the_offline_validator_refuses_a_typo_and_a_wrong_type():
    from kubernetes_validate import utils
    sts = _one("plaintext", "StatefulSet")
    sts["spec"]["replicass"] = 2
    with pytest.raises(Exception, match="replicass"):
        utils.validate(sts, utils.latest_version(), strict=True)
    sts = _one("plaintext", "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "50051x"
    with pytest.raises(Exception, match="integer"):
        utils.validate(sts, utils.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_matters_in_the_rendered_manifests(overlay):
    sts, shard, flags = _shard(overlay)
    pod = sts["spec"]["template"]
    service, pdb = _one(overlay, "Service"), _one(overlay, "PodDisruptionBudget")
    job, worker, env = _worker(overlay)

    # Stable names: a headless Service named as the StatefulSet's serviceName, selecting its pods.
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == sts["spec"]["serviceName"]
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert job["spec"]["template"]["metadata"]["labels"].items() >= {"app.kubernetes.io/component": "worker"}.items()
    assert not service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()

    # Shard count = replicas, everywhere; the workers name every shard in index order.
    replicas = sts["spec"]["replicas"]
    assert flags["shard-index"] == "auto"  # from the pod name's ordinal
    assert int(flags["num-shards"]) == replicas
    port = int(flags["port"])
    servers = env["OPTSERVE_SERVERS"].split(",")
    assert servers == [f"{sts['metadata']['name']}-{i}.{service['metadata']['name']}:{port}" for i in range(replicas)]
    assert int(env["OPTSERVE_NUM_SHARDS"]) == replicas

    # Ports: container ports, the Service's and the probes' are the ones the shard serves.
    ports = {p["name"]: p["containerPort"] for p in shard["ports"]}
    assert ports == {"grpc": port, "data": int(flags["data-port"]), "metrics": int(flags["metrics-port"])}
    for p in service["spec"]["ports"]:
        assert ports[p["targetPort"]] == p["port"], p
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(flags["metrics-port"])
    assert flags["metrics-host"] not in LOOPBACK  # else Prometheus cannot reach it
    tls = "tls-cert" in flags
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = shard[name]
        if tls:  # the kubelet's gRPC probe has no TLS: the light client in the container
            command = probe["exec"]["command"]
            assert "grpc" not in probe and command[0] == "optserve" and "health" in command
            assert command[-1] == f"localhost:{port}"
            assert _flags([c for c in command[1:-1] if c != "health"])["tls-ca"] == flags["tls-client-ca"]
        else:
            assert "exec" not in probe and probe["grpc"]["port"] == port, (name, probe)

    # The checkpoint directory is on the per-shard volume claim.
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert _mount_of(shard, flags["checkpoint-dir"])["name"] in claims
    assert "keep" not in flags or int(flags["keep"]) >= 1

    # Time for the final checkpoint after SIGTERM.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= MIN_GRACE_SECONDS

    # No plaintext off loopback without --insecure; none with TLS.
    if flags["host"] not in LOOPBACK:
        assert tls or "insecure" in flags, "plaintext off loopback needs --insecure (the shard refuses to start)"
    if tls:
        assert "insecure" not in flags
        for flag in ("tls-cert", "tls-key", "tls-client-ca"):
            assert "secret" in _volume(pod["spec"], _mount_of(shard, flags[flag])["name"])
        for var in ("OPTSERVE_TLS_CA", "OPTSERVE_TLS_CERT", "OPTSERVE_TLS_KEY"):
            assert "secret" in _volume(job["spec"]["template"]["spec"], _mount_of(worker, env[var])["name"])
    if "token-file" in flags:
        secret = _volume(pod["spec"], _mount_of(shard, flags["token-file"])["name"])["secret"]
        ref = env["OPTSERVE_TOKEN"]["secretKeyRef"]  # what RemoteAdam reads
        assert (ref["name"], ref["key"]) == (secret["secretName"], Path(flags["token-file"]).name)

    # Resources on every container; a GPU shard asks for its GPU and puts Adam there.
    for container in (shard, worker):
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    gpus = shard["resources"]["limits"].get("nvidia.com/gpu")
    assert (flags.get("device") or "cpu").startswith("cuda") == (overlay == "cuda") == (gpus == 1)


# --- the rendered commands as processes, one network namespace per pod ---------------------------

SUBNET = ipaddress.ip_network("10.244.0.0/24")


class Cluster:
    """A bridge in a node namespace and a namespace per pod on it (veth, an address, lo up)."""

    def __init__(self, tag: str, tmp: Path):
        self.tag, self.tmp = tag, tmp
        self.node = f"{tag}-node"
        self.pods: dict[str, str] = {}  # pod name -> namespace
        self.addresses: dict[str, str] = {}
        self.names: dict[str, str] = {}  # DNS name -> address (the headless Service's records)
        self.made: list[str] = []
        self._veth = 0

    def ip(self, *argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)

    def start(self) -> None:
        self.ip("netns", "add", self.node)
        self.made.append(self.node)
        self.ip("-n", self.node, "link", "set", "lo", "up")
        self.ip("-n", self.node, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.node, "addr", "add", f"{SUBNET[1]}/{SUBNET.prefixlen}", "dev", "br0")
        self.ip("-n", self.node, "link", "set", "br0", "up")

    def add_pod(self, name: str, host: int) -> str:
        ns = f"{self.tag}-{len(self.made)}"
        self.ip("netns", "add", ns)
        self.made.append(ns)
        self._veth += 1
        veth = f"veth{self._veth}"
        self.ip("-n", self.node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.ip("-n", self.node, "link", "set", veth, "master", "br0", "up")
        address = str(SUBNET[host])
        self.ip("-n", ns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
        self.ip("-n", ns, "link", "set", "eth0", "up")
        self.ip("-n", ns, "link", "set", "lo", "up")
        self.pods[name], self.addresses[name] = ns, address
        self.write_hosts()
        return ns

    def delete_pod(self, name: str) -> None:
        ns = self.pods.pop(name)
        self.addresses.pop(name)
        self.ip("netns", "del", ns)  # its veth pair goes with it

    def write_hosts(self) -> None:
        """Each pod's /etc/hosts (kubelet's own line, then the cluster's names, which DNS would answer),
        rewritten in place: `ip netns exec` bind-mounts this inode over /etc/hosts."""
        for pod, ns in [*self.pods.items(), ("node", self.node)]:
            lines = ["127.0.0.1 localhost"]
            if pod in self.addresses:
                lines.append(f"{self.addresses[pod]} {pod}")
            lines += [f"{address} {name}" for name, address in self.names.items()]
            path = Path("/etc/netns") / ns / "hosts"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a+") as f:
                f.seek(0)
                f.truncate()
                f.write("\n".join(lines) + "\n")

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _pod_env(container: dict, pod_name: str, annotations: dict[str, str], remap,
             secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet sets it: values, the downward API's fieldRefs, HOSTNAME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_") and k not in ("RANK", "POD_NAME")}
    env["HOSTNAME"] = pod_name
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = remap(e["value"])
            continue
        if "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
            continue
        field = e["valueFrom"]["fieldRef"]["fieldPath"]
        if field == "metadata.name":
            env[e["name"]] = pod_name
        elif field.startswith("metadata.annotations['"):
            env[e["name"]] = annotations[field[len("metadata.annotations['"):-2]]
        else:
            raise AssertionError(f"the test does not emulate fieldRef {field}")
    return env


def _remapper(container: dict, volumes: dict[str, Path]):
    """Paths in the container (mountPath/...) -> the directory standing in for that volume."""
    mounts = {m["mountPath"].rstrip("/"): volumes[m["name"]] for m in container.get("volumeMounts", [])}

    def remap(text: str) -> str:
        for mount, local in mounts.items():
            if text == mount or text.startswith(mount + "/"):
                return str(local) + text[len(mount):]
            if "=" in text:
                flag, value = text.split("=", 1)
                if value == mount or value.startswith(mount + "/"):
                    return f"{flag}={local}{value[len(mount):]}"
        return text
    return remap


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _wait_for(predicate, what: str, budget: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + budget
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {budget} s\n" + "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs))
        time.sleep(0.2)


def test_rendered_shards_and_workers_follow_a_shard_moved_to_another_address(tmp_path):
    overlay = "token"  # plaintext on the pod network, a bearer token from a Secret
    sts, shard, _ = _shard(overlay)
    job, worker, wenv = _worker(overlay)
    service = _one(overlay, "Service")["metadata"]["name"]
    replicas, pod_spec = sts["spec"]["replicas"], sts["spec"]["template"]["spec"]
    secrets = {"optserve-token": {"token": "k8s-test-token"}}  # kubectl create secret generic ...
    token_dir = tmp_path / "secret-optserve-token"  # a Secret volume: one file per key
    token_dir.mkdir()
    for key, value in secrets["optserve-token"].items():
        (token_dir / key).write_text(value)

    def volumes_for(pod: str, spec: dict) -> dict[str, Path]:
        out = {}
        for v in spec.get("volumes", []):
            assert "secret" in v, v
            out[v["name"]] = token_dir  # the only Secret these overlays mount is the token
        for claim in sts["spec"]["volumeClaimTemplates"]:  # the PVC data-<pod>, kept across restarts
            out[claim["metadata"]["name"]] = tmp_path / f"{claim['metadata']['name']}-{pod}"
            out[claim["metadata"]["name"]].mkdir(exist_ok=True)
        return out

    cluster = Cluster(f"optk{os.getpid()}", tmp_path)
    procs: dict[str, subprocess.Popen] = {}
    logs: list[Path] = []

    def run_shard(i: int, host: int) -> None:
        pod = f"{sts['metadata']['name']}-{i}"
        ns = cluster.add_pod(pod, host)
        cluster.names[f"{pod}.{service}"] = cluster.addresses[pod]
        cluster.write_hosts()
        remap = _remapper(shard, volumes_for(pod, pod_spec))
        argv = [remap(a) for a in shard["args"]]
        assert shard["command"] == ["optserve", "serve"]
        log = tmp_path / f"{pod}-{host}.log"
        logs.append(log)
        # The pod's host name (the shard's ordinal) in a UTS namespace of its own, as in a pod.
        procs[pod] = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', pod,
             sys.executable, "-m", "optserve", "serve", *argv],
            env=_pod_env(shard, pod, {}, remap, secrets), stdout=log.open("w"), stderr=subprocess.STDOUT)

    def probe(pod: str) -> bool:
        """The readiness probe as the kubelet runs it: gRPC health from the node to the pod's IP."""
        port = shard["readinessProbe"]["grpc"]["port"]
        return subprocess.run(["ip", "netns", "exec", cluster.node, sys.executable, "-m", "optserve",
                               "--log-level=ERROR", "health", "--timeout=4", f"{cluster.addresses[pod]}:{port}"],
                              capture_output=True, timeout=60).returncode == 0

    try:
        cluster.start()
        shards = [f"{sts['metadata']['name']}-{i}" for i in range(replicas)]
        for i in range(replicas):
            run_shard(i, 10 + i)
        for pod in shards:
            _wait_for(lambda: probe(pod) or procs[pod].poll() is not None, f"{pod} ready", 120, logs)
            assert procs[pod].poll() is None, _tail(logs[-1])

        assert worker["command"][0] == "python"
        script = ROOT / "docker" / Path(worker["command"][1]).name  # the image copies docker/worker.py
        workers = []
        for i in range(job["spec"]["completions"]):
            pod = f"{job['metadata']['name']}-{i}-x{i}k8s"
            ns = cluster.add_pod(pod, 100 + i)
            remap = _remapper(worker, volumes_for(pod, job["spec"]["template"]["spec"]))
            env = _pod_env(worker, pod, {"batch.kubernetes.io/job-completion-index": str(i)}, remap, secrets)
            log = tmp_path / f"{pod}.log"
            logs.append(log)
            workers.append((pod, log, subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(script), *worker["command"][2:]],
                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)))
            procs[pod] = workers[-1][2]
        steps = int(wenv["STEPS"])

        # Once worker 0 is a fifth of the way, the kubelet stops shard 1 (SIGTERM) ...
        moved = shards[-1]
        _wait_for(lambda: f"step {steps // 5}/{steps}" in _tail(workers[0][1]) or workers[0][2].poll() is not None,
                  "worker 0 trains", 180, logs)
        assert workers[0][2].poll() is None, _tail(workers[0][1])
        procs[moved].send_signal(signal.SIGTERM)
        assert procs[moved].wait(timeout=pod_spec["terminationGracePeriodSeconds"]) == 0, _tail(logs[1])
        old = cluster.addresses[moved]
        cluster.delete_pod(moved)
        # ... and it is scheduled again: a new pod, a new address, the same name and volume claim.
        run_shard(replicas - 1, 20)
        assert cluster.addresses[moved] != old
        for pod, log, proc in workers:
            assert proc.wait(timeout=300) == 0, f"{pod}\n{_tail(log)}\n--- {moved}\n{_tail(logs[-1])}"
            assert "OK" in _tail(log)

        # Every key's step = every push of every worker, applied once across the move. The status
        # command finds the shards from the worker's own environment (no address given).
        pod = workers[0][0]
        env = _pod_env(worker, pod, {"batch.kubernetes.io/job-completion-index": "0"},
                       _remapper(worker, volumes_for(pod, job["spec"]["template"]["spec"])), secrets)
        status = subprocess.run(["ip", "netns", "exec", cluster.pods[pod], sys.executable, "-m", "optserve",
                                 "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert len(report) == replicas
        versions = {k["key"]: k["version"] for s in report for k in s["keys"]}
        total = steps * job["spec"]["completions"]
        assert versions and set(versions.values()) == {total}, versions
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.close()


def test_the_tls_overlays_exec_probe_passes_against_its_rendered_shard(tmp_path):
    """Under TLS the kubelet's gRPC probe cannot work (it speaks plaintext); the exec probe the tls
    overlay renders does, against a shard started from the overlay's own args and Secret layout."""
    sts, shard, flags = _shard("tls")
    pod = f"{sts['metadata']['name']}-0"
    certs = tmp_path / "secret-optserve-tls"
    names = ",".join(f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}" for i in range(sts["spec"]["replicas"]))
    made = subprocess.run(["sh", str(ROOT / "docker" / "make_certs.sh")], env={**os.environ, "CERT_DIR": str(certs),
                          "CERT_NAMES": names}, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    (secret,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    volumes = {secret["name"]: certs, sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]: tmp_path / "data"}
    (tmp_path / "data").mkdir()
    remap = _remapper(shard, volumes)
    cluster = Cluster(f"optt{os.getpid()}", tmp_path)
    log = tmp_path / f"{pod}.log"
    proc = None
    try:
        cluster.start()
        ns = cluster.add_pod(pod, 10)
        cluster.names[f"{pod}.{sts['spec']['serviceName']}"] = cluster.addresses[pod]
        cluster.write_hosts()
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', pod,
             sys.executable, "-m", "optserve", "serve", *[remap(a) for a in shard["args"]]],
            env=_pod_env(shard, pod, {}, remap, {}), stdout=log.open("w"), stderr=subprocess.STDOUT)
        commands = {name: shard[name]["exec"]["command"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert len({tuple(c) for c in commands.values()}) == 1, commands
        command = [sys.executable, "-m", "optserve", *[remap(a) for a in commands["readinessProbe"][1:]]]

        def exec_probe() -> bool:  # in the container: the pod's namespace
            return subprocess.run(["ip", "netns", "exec", ns, *command], capture_output=True,
                                  timeout=60).returncode == 0
        _wait_for(lambda: exec_probe() or proc.poll() is not None, "the exec probe passes", 120, [log])
        assert proc.poll() is None, _tail(log)
        # What the kubelet's gRPC probe would do: plaintext to the pod's IP; a TLS shard fails it.
        plain = subprocess.run(["ip", "netns", "exec", cluster.node, sys.executable, "-m", "optserve",
                                "--log-level=ERROR", "health", "--timeout=4", f"{cluster.addresses[pod]}:{flags['port']}"],
                               capture_output=True, timeout=60)
        assert plain.returncode != 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.close()
