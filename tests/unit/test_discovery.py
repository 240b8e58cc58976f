"""Topology from the environment (client/discovery.py): server lists, templates, files, shard ordinals,
worker names; every mistake names the variable to fix."""
from __future__ import annotations

import pytest

from optserve.client.discovery import client_id_from_env, servers_from_env, shard_index_from_env


def test_a_comma_list_in_shard_index_order():
    assert servers_from_env({"OPTSERVE_SERVERS": "a:1, b:2,c:3"}) == ["a:1", "b:2", "c:3"]


def test_a_template_names_every_shard():
    env = {"OPTSERVE_SERVERS": "optserve-{i}.optserve:50051", "OPTSERVE_NUM_SHARDS": "3"}
    assert servers_from_env(env) == [f"optserve-{i}.optserve:50051" for i in range(3)]


def test_a_file_with_one_address_a_line(tmp_path):
    f = tmp_path / "servers"
    f.write_text("# shard 0\nps-0:50051\n\nps-1:50051  # shard 1\n")
    assert servers_from_env({"OPTSERVE_SERVERS_FILE": str(f)}) == ["ps-0:50051", "ps-1:50051"]


@pytest.mark.parametrize("env, words", [
    ({}, "set OPTSERVE_SERVERS"),
    ({"OPTSERVE_SERVERS": "ps-{i}:1"}, "set OPTSERVE_NUM_SHARDS"),
    ({"OPTSERVE_SERVERS": "ps-{i}:1", "OPTSERVE_NUM_SHARDS": "zero"}, "OPTSERVE_NUM_SHARDS"),
    ({"OPTSERVE_SERVERS": "a:1,b:2", "OPTSERVE_NUM_SHARDS": "3"}, "lists 2 shards but OPTSERVE_NUM_SHARDS is 3"),
    ({"OPTSERVE_SERVERS": "a:1,,b:2"}, "expected host:port"),
    ({"OPTSERVE_SERVERS": "a"}, "expected host:port"),
    ({"OPTSERVE_SERVERS": "a:1,a:1"}, "appears twice"),
    ({"OPTSERVE_SERVERS": "a:1", "OPTSERVE_SERVERS_FILE": "f"}, "not both"),
    ({"OPTSERVE_SERVERS_FILE": "/nonexistent/servers"}, "OPTSERVE_SERVERS_FILE=/nonexistent/servers"),
])
def test_missing_or_inconsistent_topology_names_the_variable(env, words):
    with pytest.raises(ValueError, match=words):
        servers_from_env(env)


def test_shard_index_auto_from_the_variable_or_the_host_names_ordinal():
    assert shard_index_from_env({"OPTSERVE_SHARD_INDEX": "4"}, hostname="whatever") == 4
    assert shard_index_from_env({}, hostname="optserve-2") == 2
    assert shard_index_from_env({}, hostname="optserve-12.optserve.ns.svc.cluster.local") == 12
    with pytest.raises(ValueError, match="OPTSERVE_SHARD_INDEX"):
        shard_index_from_env({}, hostname="laptop")
    with pytest.raises(ValueError, match="non-negative integer"):
        shard_index_from_env({"OPTSERVE_SHARD_INDEX": "-1"}, hostname="optserve-2")


def test_a_worker_is_named_by_its_launcher_where_there_is_one():
    assert client_id_from_env({"RANK": "3", "POD_NAME": "job-worker-0"}) == "rank3"
    assert client_id_from_env({"POD_NAME": "job-worker-0"}) == "job-worker-0"
    assert client_id_from_env({}) is None
