"""Topology from the environment that runs the job: which shards exist, which one a shard process is,
and a worker's name. Read once, at construction; standard library only.

A worker (RemoteAdam with servers=None, and the client commands given no address) reads, in order:
  OPTSERVE_SERVERS       "host:port,host:port,..." in shard-index order (a replicated shard index is
                         its replicas joined by "|": "a:50051|b:50051"), or a template holding "{i}"
                         ("optserve-{i}.optserve:50051", a StatefulSet's stable names) together with
  OPTSERVE_NUM_SHARDS    how many shards the template names;
  OPTSERVE_SERVERS_FILE  a file with one address per line in shard-index order (# comments allowed),
                         for engines that mount the topology (a ConfigMap).
A shard started with `--shard-index auto` takes OPTSERVE_SHARD_INDEX, else the ordinal that ends its
host name (a StatefulSet pod "optserve-2" is shard 2). Missing or inconsistent values are a
ValueError naming the variable.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Mapping

SERVERS_ENV = "OPTSERVE_SERVERS"
NUM_SHARDS_ENV = "OPTSERVE_NUM_SHARDS"
SERVERS_FILE_ENV = "OPTSERVE_SERVERS_FILE"
SHARD_INDEX_ENV = "OPTSERVE_SHARD_INDEX"
_ORDINAL = re.compile(r"-(\d+)$")


def servers_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The shard addresses in shard-index order, from the environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    value, path = env.get(SERVERS_ENV, "").strip(), env.get(SERVERS_FILE_ENV, "").strip()
    if value and path:
        raise ValueError(f"set one of {SERVERS_ENV} and {SERVERS_FILE_ENV}, not both")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"{SERVERS_FILE_ENV}={path}: {exc.strerror or exc}") from None
        servers = [line.split("#", 1)[0].strip() for line in lines]
        servers = [s for s in servers if s]
        source = f"{SERVERS_FILE_ENV}={path}"
    elif "{i}" in value:
        count = env.get(NUM_SHARDS_ENV, "").strip()
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{SERVERS_ENV}={value!r} is a template: set {NUM_SHARDS_ENV} to the number of "
                             f"shards (a positive integer), got {count!r}")
        servers = [value.replace("{i}", str(i)) for i in range(int(count))]
        source = SERVERS_ENV
    elif value:
        servers = [s.strip() for s in value.split(",")]
        source = SERVERS_ENV
        count = env.get(NUM_SHARDS_ENV, "").strip()
        if count and count != str(len(servers)):
            raise ValueError(f"{SERVERS_ENV} lists {len(servers)} shards but {NUM_SHARDS_ENV} is {count}")
    else:
        raise ValueError(f"no shard addresses: pass servers=, or set {SERVERS_ENV} (a comma list in "
                         f"shard-index order, or a template with {{i}} and {NUM_SHARDS_ENV}) or "
                         f"{SERVERS_FILE_ENV}")
    bad = [s for s in servers if not s or ":" not in s]
    if not servers or bad:
        raise ValueError(f"{source}: expected host:port addresses, got {servers!r}")
    if len(set(servers)) != len(servers):
        raise ValueError(f"{source}: an address appears twice in {servers!r}")
    return servers


def shard_index_from_env(environ: Mapping[str, str] | None = None, hostname: str | None = None) -> int:
    """`--shard-index auto`: OPTSERVE_SHARD_INDEX, else the host name's trailing ordinal."""
    env = os.environ if environ is None else environ
    value = env.get(SHARD_INDEX_ENV, "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"{SHARD_INDEX_ENV} must be a non-negative integer, got {value!r}")
        return int(value)
    hostname = socket.gethostname() if hostname is None else hostname
    match = _ORDINAL.search(hostname.split(".", 1)[0])
    if match is None:
        raise ValueError(f"--shard-index auto: set {SHARD_INDEX_ENV}, or run where the host name ends in the "
                         f"shard's ordinal (a StatefulSet pod 'optserve-2'); this host is {hostname!r}")
    return int(match.group(1))


def client_id_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """A stable worker name where the launcher gives one: torchrun's RANK ("rank3"), else a pod's
    name (POD_NAME, set from the downward API). None elsewhere (RemoteAdam then picks a random id)."""
    env = os.environ if environ is None else environ
    rank = env.get("RANK", "").strip()
    if rank:
        return f"rank{rank}"
    return env.get("POD_NAME", "").strip() or None
