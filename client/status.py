"""`optserve status ADDR...`: what each shard holds (keys, shapes, versions, pushes, staleness), and
for a replicated shard each replica's role, epoch, lag and whether its backup is in sync.

Reads shards through Stats only; never changes anything.
"""
from __future__ import annotations

import json
from typing import Sequence, TextIO

from optserve.client.transport import REPLICA_SEPARATOR, RetryPolicy, Security, ShardClient, ShardError


def collect(addresses: Sequence[str], timeout: float = 10.0, security: Security | None = None) -> list[dict]:
    """Stats of every shard as plain dicts; an unreachable shard gives {"address", "error"}."""
    out = []
    # a replicated shard ("a|b", client/transport.py) is shown replica by replica
    for address in [a for spec in addresses for a in spec.split(REPLICA_SEPARATOR)]:
        client = ShardClient(address, timeout=timeout, retry=RetryPolicy(budget=1.0),  # say so quickly
                             security=security)
        try:
            stats = client.stats()
            out.append({"address": address, **_to_dict(stats)})
        except ShardError as exc:
            out.append({"address": address, "error": f"{exc.code.name}: {exc.details}"})
        finally:
            client.close()
    return out


def _to_dict(message) -> dict:
    """A message as a dict of plain Python values (integers stay integers, unlike proto JSON)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            value = [_to_dict(v) for v in value] if field.is_repeated else _to_dict(value)
        elif field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out


def render(shards: list[dict], out: TextIO) -> None:
    """A plain-text table per shard."""
    for s in shards:
        if "error" in s:
            print(f"{s['address']}: unreachable ({s['error']})", file=out)
            continue
        h = s["shard"]
        st = s["staleness"]
        print(f"{s['address']}: shard {h['shard_index']}/{h['num_shards']}  policy {h['policy']}  "
              f"device {h['device']}  version {h['server_version']}", file=out)
        print(f"  keys {len(s['keys'])}  pushes {s['pushes']}  pulls {s['pulls']}  "
              f"bytes in {s['bytes_in']}  out {s['bytes_out']}  rejected {s['rejected']}  "
              f"duplicates {s['duplicates']}  dropped {s['dropped']}", file=out)
        r = h.get("replication")
        if r and r["role"]:
            primary = f"  primary {r['primary']}" if r["primary"] and r["role"] != "primary" else ""
            print(f"  replica {r['replica_index']} of {','.join(r['replicas'])}: {r['role']}"
                  f"{' (solo)' if r['solo'] else ''}  epoch {r['epoch']}  operation {r['index']}{primary}",
                  file=out)
            for peer in r["peers"]:
                print(f"    backup {peer['address']}: " + (f"in sync, lag {peer['lag']}" if peer["in_sync"]
                                                             else f"NOT in sync ({peer['error']})"), file=out)
        print("  data channel: " + (f"port {h['data_port']}, {s['data_calls']} calls"
                                     if h["data_port"] else "none (tensors over gRPC)"), file=out)
        hist = s["staleness"]["histogram"]
        top = max((i for i, n in enumerate(hist) if n), default=0)
        print(f"  staleness: {st['count']} pushes, mean {st['mean']:.2f}, max {st['max']}, histogram "
              f"{' '.join(f'{i}:{n}' for i, n in enumerate(hist[:top + 1]) if n) or '-'}", file=out)
        if s["checkpoint"]:
            print(f"  checkpoint {s['checkpoint']} ({s['checkpoint_age']:.0f} s ago)", file=out)
        if s["keys"]:
            width = max(len(k["key"]) for k in s["keys"])
            print(f"  {'key':<{width}}  {'shape':<16} {'version':>8} {'pushes':>8} {'dropped':>8} "
                  f"{'stale mean':>10} {'max':>5}", file=out)
            for k in s["keys"]:
                shape = "x".join(str(d) for d in k["shape"]) or "scalar"
                ks = k["staleness"]
                print(f"  {k['key']:<{width}}  {shape:<16} {k['version']:>8} {k['pushes']:>8} "
                      f"{k['dropped']:>8} {ks['mean']:>10.2f} {ks['max']:>5}", file=out)


def status_main(addresses: Sequence[str], as_json: bool, out: TextIO,
                security: Security | None = None) -> int:
    shards = collect(addresses, security=security)
    if as_json:
        json.dump(shards, out, indent=2)
        out.write("\n")
    else:
        render(shards, out)
    return 1 if any("error" in s for s in shards) else 0
