"""`optserve status ADDR...`: what each shard holds (keys, shapes, versions, pushes, staleness).

Reads shards through Stats only; never changes anything.
"""
from __future__ import annotations

import json
from typing import Sequence, TextIO

from optserve.client.transport import RetryPolicy, ShardClient, ShardError


def collect(addresses: Sequence[str], timeout: float = 10.0) -> list[dict]:
    """Stats of every shard as plain dicts; an unreachable shard gives {"address", "error"}."""
    out = []
    for address in addresses:
        client = ShardClient(address, timeout=timeout, retry=RetryPolicy(budget=1.0))  # say so quickly
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
              f"staleness mean {st['mean']:.2f} max {st['max']}", file=out)
        if s["keys"]:
            width = max(len(k["key"]) for k in s["keys"])
            print(f"  {'key':<{width}}  {'shape':<16} {'version':>8} {'pushes':>8} {'stale mean':>10} "
                  f"{'max':>5}", file=out)
            for k in s["keys"]:
                shape = "x".join(str(d) for d in k["shape"]) or "scalar"
                ks = k["staleness"]
                print(f"  {k['key']:<{width}}  {shape:<16} {k['version']:>8} {k['pushes']:>8} "
                      f"{ks['mean']:>10.2f} {ks['max']:>5}", file=out)


def status_main(addresses: Sequence[str], as_json: bool, out: TextIO) -> int:
    shards = collect(addresses)
    if as_json:
        json.dump(shards, out, indent=2)
        out.write("\n")
    else:
        render(shards, out)
    return 1 if any("error" in s for s in shards) else 0
