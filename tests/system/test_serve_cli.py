"""`optserve serve` as a real process, driven through RemoteAdam and `optserve status`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from optserve import RemoteAdam

pytestmark = pytest.mark.system

OPTSERVE = [sys.executable, "-m", "optserve.cli"]


def start_shard(*args: str) -> tuple[subprocess.Popen, str]:
    """Start a shard on a free port; return the process and the address it printed."""
    proc = subprocess.Popen([*OPTSERVE, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the shard is bound (or the process died)
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"shard did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split()[-1]


def test_serve_process_trains_reports_status_and_stops_cleanly_on_sigterm():
    proc, address = start_shard("--shard-index", "0", "--num-shards", "1")
    try:
        model = nn.Linear(4, 2)
        with RemoteAdam(model.named_parameters(), [address], lr=0.1) as opt:
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(8, 4)).pow(2).mean().backward()
                opt.step()

        table = subprocess.run([*OPTSERVE, "status", address], capture_output=True, text=True, timeout=60)
        as_json = subprocess.run([*OPTSERVE, "status", "--json", address], capture_output=True, text=True,
                                 timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        stderr = proc.stderr.read()

    assert table.returncode == 0, table.stderr
    assert "weight" in table.stdout and "shard 0/1" in table.stdout
    shards = json.loads(as_json.stdout)
    assert {k["key"]: (k["shape"], k["version"], k["pushes"]) for k in shards[0]["keys"]} == {
        "weight": ([2, 4], 3, 3), "bias": ([2], 3, 3)}
    assert shards[0]["pushes"] == 3
    data_port = shards[0]["shard"]["data_port"]
    assert data_port and shards[0]["data_calls"] == 1 + 3  # the pull after registering, 3 PushPulls
    assert f"data channel: port {data_port}, 4 calls" in table.stdout
    assert code == 0
    assert "stopped" in stderr


def test_status_of_an_unreachable_shard_says_so_and_fails():
    result = subprocess.run([*OPTSERVE, "status", "127.0.0.1:1"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GRPC_VERBOSITY": "NONE"})

    assert result.returncode == 1
    assert "unreachable" in result.stdout


def test_serve_refuses_a_bad_shard_index_with_a_clear_message():
    result = subprocess.run([*OPTSERVE, "serve", "--shard-index", "2", "--num-shards", "2"],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "shard index must be in 0..1" in result.stderr


@pytest.mark.parametrize("taken", ["--port", "--data-port", "--metrics-port"])
def test_serve_on_a_port_in_use_fails_with_a_message_not_a_traceback(taken):
    import socket
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        args = ["--port", "0", "--data-port", "0", "--metrics-port", "0"]
        args[args.index(taken) + 1] = port
        result = subprocess.run([*OPTSERVE, "serve", *args], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "GRPC_VERBOSITY": "NONE"})

    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "listening on" not in result.stdout  # nothing announced for a shard that did not start
    assert port in result.stderr


def test_serve_on_ipv6_loopback_listens_on_a_bracketed_address():
    if not socket_has_ipv6():
        pytest.skip("this machine has no IPv6 loopback")  # a property of the host, not of optserve
    proc, address = start_shard("--host", "::1")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)

    assert address.startswith("[::1]:")


def socket_has_ipv6() -> bool:
    import socket
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


def test_client_commands_refuse_an_empty_token_file(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = subprocess.run([*OPTSERVE, "status", "--token-file", str(empty), "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2 and "is empty" in result.stderr


def test_shard_index_auto_reads_the_environment():
    env = {**os.environ, "OPTSERVE_SHARD_INDEX": "2"}
    proc = subprocess.Popen([*OPTSERVE, "serve", "--port", "0", "--shard-index", "auto", "--num-shards", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), proc.stderr.read() if proc.poll() is not None else line
        shards = json.loads(subprocess.run([*OPTSERVE, "status", "--json", line.split()[-1]], capture_output=True,
                                           text=True, timeout=60).stdout)
        assert (shards[0]["shard"]["shard_index"], shards[0]["shard"]["num_shards"]) == (2, 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    bad = subprocess.run([*OPTSERVE, "serve", "--port", "0", "--shard-index", "auto"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "OPTSERVE_SHARD_INDEX": "two"})
    assert bad.returncode == 2 and "OPTSERVE_SHARD_INDEX must be a non-negative integer" in bad.stderr
