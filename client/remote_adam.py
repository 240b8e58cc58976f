"""RemoteAdam: a torch.optim.Optimizer whose Adam state and update live on optserve shards.

`step()` pushes the gradients of the parameters that have one to every shard at once (one PushPull
round trip per shard) and copies the fresh parameters back into the model in place. The optimizer
holds no Adam state locally: `opt.state[p]` and `state_dict()` fetch it from the shards in torch's
format and `load_state_dict()` writes it back. This module does no tensor math.

Which values win, the model's or the shards'? (README "Resuming and joining"):
  * at construction, `init="shard"` (default) adopts what the shards hold (a worker joining a running
    job); `init="model"` writes the model's values with fresh Adam state over them (torch.optim.Adam
    built on this model; resuming a checkpoint against running shards);
  * a parameter the user changed in place since the optimizer last synchronised it (the tensor's
    version counter moved: `model.load_state_dict`, a hand-set weight) is written to the shards before
    the next step, as torch's Adam would step from it;
  * `load_state_dict` pairs a state only with model values of the same step, and never moves a key
    back to an older step unless `init="model"`; a round trip of this optimizer's own state is a no-op.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import grpc
import torch

from optserve.errors import DROP_GRADIENT, ROLLBACK
from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import (ADAM_STATE, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, WIRE_DTYPES, Outgoing,
                            dtype_to_proto, hyper_to_proto)
from optserve.client.discovery import client_id_from_env, servers_from_env
from optserve.client.partition import DEFAULT_SLICE_ELEMENTS, Placement, partition
from optserve.client.transport import RetryPolicy, Security, ShardClient, ShardError

log = logging.getLogger("optserve.client")

_INITS = ("shard", "model")
# The top-level entry state_dict() adds to torch's format (plain strings and ints).
_META = "optserve"


def _named_groups(params) -> tuple[list[dict[str, Any]], list[str]]:
    """Normalize params (tensors, (name, tensor) pairs, or groups of either) into plain groups + names.

    Names key the shard map, so every worker must derive the same ones: given names are used as they
    are (and kept as the group's `param_names`, torch's format); unnamed parameters are called
    `param.<i>` in the order they are given. A tensor given twice is refused: it would be two keys
    stepping one tensor.
    """
    if isinstance(params, torch.Tensor):  # torch's own check and words
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        "but got " + torch.typename(params))
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out, names = [], []
    seen: dict[torch.Tensor, str] = {}
    named = None
    for group in groups:
        if not isinstance(group, dict):
            raise TypeError(f"param groups must all be dicts, got {type(group).__name__}")
        group = dict(group)
        ps = group["params"]
        if isinstance(ps, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list "
                            "instead.")
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        tensors, group_names = [], []
        kinds = {isinstance(item, tuple) for item in ps}
        if len(kinds) > 1:  # torch's words, here and below
            raise ValueError("all optimizer params should be with/without names. Some param names are "
                             "missing")
        if kinds and named is not None and kinds != {named}:
            raise ValueError("all optimizer param groups should be with/without names. cannot add param "
                             f"group {'with names' if named is False else 'without names'} to the optimizer")
        for item in ps:
            is_named = isinstance(item, tuple)
            named = is_named
            name, p = item if is_named else (f"param.{len(names)}", item)
            if not isinstance(p, torch.Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                                + torch.typename(p))
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
            if p in seen:
                again = "" if p in tensors else "; some parameters appear in more than one parameter group"
                raise ValueError(f"parameter {name!r} is the same tensor as {seen[p]!r}: give each parameter "
                                 f"once (one tensor, one key){again}")
            seen[p] = name
            tensors.append(p)
            group_names.append(name)
            names.append(name)
        group["params"] = tensors
        if named:
            group["param_names"] = group_names
        out.append(group)
    return out, names


def _check_options(lr, betas, eps, weight_decay, foreach, fused) -> None:
    """torch.optim.Adam's checks, in its words (its tests match them); ints pass where torch wants floats."""
    if isinstance(lr, torch.Tensor):
        if foreach:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if tensors[0] != tensors[1]:
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            if foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and "
                                 "foreach=True")
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def _check_arguments(servers, init: str, capturable: bool, differentiable: bool, wire_dtype: torch.dtype,
                     pull_dtype: torch.dtype, chunk_bytes: int, max_message_bytes: int,
                     bucket_bytes: int) -> list[str]:
    """RemoteAdam's own arguments (torch's are _check_options'); returns the server list."""
    if capturable or differentiable:
        raise ValueError("RemoteAdam applies Adam on the shards: capturable=True (CUDA graphs) and "
                         "differentiable=True (autograd through step) cannot apply; leave them False")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if servers is None:  # the environment that runs the job names them (client/discovery.py)
        servers = servers_from_env()
    servers = [servers] if isinstance(servers, str) else list(servers)
    if not servers:
        raise ValueError("RemoteAdam needs at least one server address")
    for name, dtype in (("wire_dtype", wire_dtype), ("pull_dtype", pull_dtype)):
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"{name} must be one of {list(WIRE_DTYPES)}, got {dtype}")
    if not 4096 <= chunk_bytes <= max_message_bytes - (64 << 10):
        raise ValueError(f"chunk_bytes must be in 4096..{max_message_bytes - (64 << 10)}, got {chunk_bytes}")
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    return servers


class _ShardState(MutableMapping):
    """`opt.state`: each parameter's Adam state as torch's Adam keeps it, fetched from the shards on
    access (one fetch per parameter, kept until the next step or load), so step() pays nothing for it.

    Like torch's defaultdict, a parameter with no step yet reads as {}. Writes to a parameter's entry
    are refused unless they put back the very tensors read (frameworks that move state to a device on
    CPU do that): RemoteAdam's state lives on the shards, written with load_state_dict(). Keys that
    are not parameters (what hooks and frameworks note there) are kept here, as torch keeps them.
    """

    def __init__(self, opt: "RemoteAdam"):
        self._opt = opt
        self._cache: dict[torch.Tensor, dict[str, Any]] = {}
        self.extra: dict[Any, Any] = {}

    def _ours(self, p) -> bool:
        return isinstance(p, torch.Tensor) and p in self._opt._names

    def invalidate(self) -> None:
        self._cache.clear()

    def _fill(self, params: Sequence[torch.Tensor]) -> None:
        missing = [p for p in params if p not in self._cache]
        if missing:
            fetched, _ = self._opt._fetch_state(missing)
            for p in missing:
                self._cache[p] = fetched.get(p, {})

    def __getitem__(self, p):
        if not self._ours(p):
            return self.extra.setdefault(p, {})  # torch's defaultdict(dict) answers every key
        self._fill([p])
        return self._cache[p]

    def __setitem__(self, p, value) -> None:
        if not self._ours(p):
            self.extra[p] = value
            return
        current = self[p]
        same = isinstance(value, dict) and value.keys() == current.keys() and all(
            value[k] is current[k] or (isinstance(value[k], torch.Tensor)
                                       and value[k].device == current[k].device
                                       and torch.equal(value[k], current[k])) for k in current)
        if not same:
            raise TypeError("RemoteAdam's Adam state lives on the shards: change it with load_state_dict(), "
                            "not by assigning to opt.state")

    def __delitem__(self, p) -> None:
        if not self._ours(p):
            del self.extra[p]
            return
        raise TypeError("RemoteAdam's Adam state lives on the shards: it cannot be deleted from opt.state")

    def _stepped(self) -> list[torch.Tensor]:
        versions = self._opt.versions
        return [p for p in self._opt._names
                if any(versions.get(pl.key, 0) > 0 for pl in self._opt._placed[p])]

    def __iter__(self):
        return iter(self._stepped() + list(self.extra))

    def __len__(self) -> int:
        return len(self._stepped()) + len(self.extra)

    def __contains__(self, p) -> bool:
        if not self._ours(p):
            return p in self.extra
        return any(p is q for q in self._stepped())

    def items(self):  # one fetch for all, not one per parameter
        params = self._stepped()
        self._fill(params)
        return [(p, self._cache[p]) for p in params] + list(self.extra.items())

    def values(self):
        return [v for _, v in self.items()]

    def __repr__(self) -> str:
        return f"<RemoteAdam state of {len(self)} parameters on {len(self._opt._shards)} shard(s)>"


class RemoteAdam(torch.optim.Optimizer):
    """Adam (labml_nn's, DESIGN.md "Semantics") applied by optserve shards.

    params: `model.named_parameters()` (keys are the names), plain parameters, or param groups of
    either with their own options. servers: the shard addresses in shard-index order (None: from
    OPTSERVE_SERVERS or OPTSERVE_SERVERS_FILE, client/discovery.py). Options are the seed's;
    changing a group's option (an lr scheduler) takes effect on the next step.
    torch.optim.Adam's numbers: eps=1e-8, optimized_update=False, weight_decouple=False (AdamW:
    True, or decoupled_weight_decay=True). maximize=True ascends (the gradient is negated before it is
    sent). foreach, fused (any value) and capturable, differentiable (False) are accepted for
    torch's signature and change nothing: the shard picks its kernel.
    init: "shard" (default) adopts the values and Adam state of keys the shards already hold (a
    worker joining a running job; keys not registered yet take the model's values); "model" writes
    the model's current values with fresh Adam state over every key, as building torch.optim.Adam on
    this model starts afresh (resume a checkpoint against shards that are still running: build with
    init="model", then load_state_dict). See the module docstring for which values win later.
    Transport options: slice_elements (tensors larger than this are cut across shards),
    chunk_bytes (payload per streamed message), timeout (seconds per call), connect_timeout (seconds
    to wait for each shard at construction), wire_dtype (float32, bfloat16 or float16 gradients),
    pull_dtype (the same choice for the parameters pulled by step(); the shard keeps float32 state
    either way, and registration and state_dict always travel in float32; with float16 a gradient
    beyond its range, 65504, is refused with a ValueError before it is sent), client_id (a name for
    this worker, kept as `self.client_id`; by default "rank<RANK>" under torchrun, POD_NAME in a pod,
    else a random id; pushes carry `self.push_id`,
    "<client_id>/<random>" (or the random client_id itself), unique to this instance, so each is
    applied once and never taken for another instance's retry), retry_budget (seconds within which
    UNAVAILABLE and DEADLINE_EXCEEDED are retried with backoff: a restarting shard is waited for;
    pushes are retried safely, each applied once), data_channel (True: pushes and pulls use the
    shard's data channel when it announces one, raw frames over TCP, see docs/ARCHITECTURE.md; False:
    everything over gRPC), shm (True: on the shard's host, or sharing its /dev/shm, the data channel's
    bytes go through a shared-memory segment instead of the socket; False: never).
    Security: tls=True (or root_certificates=PEM bytes, or OPTSERVE_TLS_CA=path) for TLS;
    certificate_chain and private_key (PEM; or OPTSERVE_TLS_CERT, OPTSERVE_TLS_KEY paths) for mutual
    TLS; token (or OPTSERVE_TOKEN, else the file OPTSERVE_TOKEN_FILE) is sent as `authorization: Bearer
    <token>` on every call.
    overlap=True sends gradients during backward: a hook on each parameter
    (register_post_accumulate_grad_hook) fills buckets of `bucket_bytes` (25 MiB default) in reverse
    registration order, and each full bucket is pushed at once; step() pushes what is left, waits,
    and pulls. For gradient accumulation wrap every micro-batch but the last in `with opt.no_sync():`.
    As with DDP's hooks, a pushed bucket is final: a gradient changed in place after backward
    (clipping, GradScaler.unscale_) makes step() raise, since the shards applied it unchanged; an
    option set by hand (lr) applies from the next step (it is logged); a step() skipped after
    backward (GradScaler on inf, a NaN guard) has been applied anyway. Transform gradients in the loss
    or in hooks; then the numbers equal overlap=False bitwise.
    """

    def __init__(self, params, servers: Sequence[str] | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-16, weight_decay: float = 0.0,
                 weight_decouple: bool = True, absolute: bool = False, optimized_update: bool = True,
                 amsgrad: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 decoupled_weight_decay: bool | None = None, init: str = "shard",
                 slice_elements: int = DEFAULT_SLICE_ELEMENTS,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = 300.0, connect_timeout: float = 30.0,
                 wire_dtype: torch.dtype = torch.float32, pull_dtype: torch.dtype = torch.float32,
                 overlap: bool = False, bucket_bytes: int = 25 * 1024 * 1024, retry_budget: float = 60.0,
                 tls: bool = False, root_certificates: bytes | None = None,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None,
                 token: str | None = None, client_id: str | None = None, data_channel: bool = True,
                 shm: bool = True):
        # 1. check the options (torch's checks in torch's words, then RemoteAdam's own)
        _check_options(lr, betas, eps, weight_decay, foreach, fused)
        servers = _check_arguments(servers, init, capturable, differentiable, wire_dtype, pull_dtype,
                                   chunk_bytes, max_message_bytes, bucket_bytes)
        if decoupled_weight_decay is not None:  # torch >= 2.6's name for AdamW's decay
            weight_decouple = bool(decoupled_weight_decay)
        betas = tuple(float(b) for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        weight_decouple=weight_decouple, absolute=absolute,
                        optimized_update=optimized_update, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
        groups, names = _named_groups(params)
        for g in groups:
            _config(dict(defaults, **g))  # validate every group's options once, here
        self._growing = True  # torch's __init__ calls add_param_group; the shards are not known yet
        super().__init__(groups, defaults)
        self._growing = False
        self.init = init
        self.wire_dtype = wire_dtype
        self.pull_dtype = pull_dtype
        self.overlap = overlap
        self.slice_elements = slice_elements
        client_id = client_id or client_id_from_env()  # torchrun's RANK, a pod's name, or none
        self.client_id = client_id or uuid.uuid4().hex
        # Shards apply each (push_id, seq) once: a fresh id per instance keeps a rebuilt or restarted
        # worker with the same client_id (seq starting at 1 again) from being answered as a retry.
        self.push_id = f"{client_id}/{uuid.uuid4().hex[:12]}" if client_id else self.client_id
        self._init_tracking(len(servers))

        # 2. connect; 3. place the parameters on the shards and register them
        security = Security.from_env(tls, root_certificates, certificate_chain, private_key, token)
        self._connect(servers, security, timeout, chunk_bytes, max_message_bytes,
                      RetryPolicy(budget=retry_budget), data_channel, shm)
        try:
            self._check_topology(connect_timeout)
            self._place(self.param_groups, names)
            if overlap:
                self._bucket_bytes = bucket_bytes
                self._setup_overlap()
        except BaseException:
            self.close()
            raise
        self.state = _ShardState(self)

    # -- construction ----------------------------------------------------------------------------

    def _init_tracking(self, num_shards: int) -> None:
        """What the optimizer keeps about its parameters, keys, pushes and snapshots (no Adam state)."""
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._sync = True
        self._snapshots: collections.deque[str] = collections.deque(maxlen=16)  # ids of own state_dict()s
        self._snapshot_ids = itertools.count(1)
        self.versions: dict[str, int] = {}
        self.last_staleness: dict[str, int] = {}  # per key: the staleness of its push in the last step
        self.dropped_pushes = 0  # pushes a policy discarded (ssp over the bound, sync late)
        self._names: dict[torch.Tensor, str] = {}
        self._params_by_name: dict[str, torch.Tensor] = {}
        self._group_of: dict[torch.Tensor, int] = {}
        self._placed: dict[torch.Tensor, list[Placement]] = {}
        self.placements: list[Placement] = []
        self._by_shard: list[list[Placement]] = [[] for _ in range(num_shards)]
        # What the model holds, per parameter: the version counter seen when the optimizer last wrote
        # or read the shards' values into it (pulls write through .data, which leaves it alone), and
        # whether its values are the user's (registered from the model, init="model") rather than
        # values pulled from the shards.
        # Lists in parameter order (and a slot per id(p)): step() checks every parameter, and hashing
        # a tensor goes through Python.
        self._plist: list[torch.Tensor] = []
        self._seen: list[int] = []
        self._slot: dict[int, int] = {}
        self._user_values: set[int] = set()
        self._staging: dict[torch.Tensor, torch.Tensor] = {}  # contiguous stand-ins of strided params

    def _connect(self, servers: Sequence[str], security: Security, timeout: float, chunk_bytes: int,
                 max_message_bytes: int, retry: RetryPolicy, data_channel: bool, shm: bool = True) -> None:
        """A client per shard (channels open lazily) and a thread per shard for the fan-out."""
        self._shards = [ShardClient(a, timeout=timeout, chunk_bytes=chunk_bytes,
                                    max_message_bytes=max_message_bytes, retry=retry, security=security,
                                    data_channel=data_channel, shm=shm) for a in servers]
        self._pool = ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="remote-adam")

    def _check_topology(self, connect_timeout: float) -> None:
        hellos = self._fan_out(lambda s: s.hello(wait=connect_timeout))
        for i, (shard, hello) in enumerate(zip(self._shards, hellos)):
            if (hello.shard_index, hello.num_shards) != (i, len(self._shards)):
                raise ValueError(f"servers[{i}] ({shard.address}) is shard {hello.shard_index} of "
                                 f"{hello.num_shards}, but RemoteAdam was given {len(self._shards)} "
                                 f"servers: list every shard, in shard-index order")

    def _place(self, groups: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
        """Put these groups' parameters on the shards (after any placed before) and register them."""
        params = [p for g in groups for p in g["params"]]
        for p, name in zip(params, names):
            if p.dtype != torch.float32:
                raise ValueError(f"parameter {name!r} is {p.dtype}; RemoteAdam serves float32 parameters")
            if name in self._params_by_name:
                raise ValueError(f"parameter name {name!r} is already in this optimizer")
        load = [sum(pl.numel for pl in pls) for pls in self._by_shard]
        new = partition([(n, tuple(p.shape)) for p, n in zip(params, names)], len(self._shards),
                        self.slice_elements, load=load)
        first_group = len(self.param_groups) - len(groups)
        for gi, g in enumerate(groups, start=first_group):
            for p in g["params"]:
                self._group_of[p] = gi
        for p, name in zip(params, names):
            self._names[p] = name
            self._params_by_name[name] = p
            self._placed[p] = []
            if not p.is_contiguous():  # channels_last, transposed views: staged through a contiguous copy
                self._staging[p] = p.detach().contiguous()
        for pl in new:
            self._placed[self._params_by_name[pl.param]].append(pl)
            self._by_shard[pl.shard].append(pl)
        self.placements.extend(new)
        by_shard = [[pl for pl in new if pl.shard == i] for i in range(len(self._shards))]
        adopted: set[str] = set()
        for keys in self._fan_out(lambda i: self._register_shard(by_shard[i]), range(len(self._shards))):
            adopted.update(keys)
        for p in params:
            self._mark_synced(p, user=not any(pl.key in adopted for pl in self._placed[p]))

    def _register_shard(self, placements: Sequence[Placement]) -> set[str]:
        """Register these keys on their shard (values and Adam state as `init` says), pull them into
        the model; returns the keys whose values were adopted from the shard."""
        if not placements:
            return set()
        shard = self._shards[placements[0].shard]
        specs = [pb.KeySpec(name=pl.key, shape=pl.shape, dtype=pb.FLOAT32, param=pl.param, offset=pl.start,
                            param_shape=self._params_by_name[pl.param].shape) for pl in placements]
        base = dict(keys=specs, shard_index=placements[0].shard, num_shards=len(self._shards))
        reply = shard.register(pb.RegisterHead(**base, with_values=False))
        existing = {pl.key for pl, st in zip(placements, reply.keys) if st.exists}
        missing = [pl for pl in placements if pl.key not in existing]
        if missing:
            # Only this worker's values for keys no one has registered; existing keys keep theirs.
            mine = [s for s, pl in zip(specs, placements) if pl in missing]
            head = pb.RegisterHead(**base | {"keys": mine}, with_values=True)
            reply = shard.register(head, [Outgoing(i, pb.PARAM, self._flat(pl, self._model_values(pl)))
                                          for i, pl in enumerate(missing)])
            existing |= {pl.key for pl, st in zip(missing, reply.keys) if not st.created}  # lost a race
        if self.init == "model" and existing:
            # The model's values, with fresh Adam state, replace what the shards held.
            self._write_shard(placements[0].shard, [pl for pl in placements if pl.key in existing], {})
            existing = set()
        with torch.no_grad():  # adopt the shard's values (another worker's, if it registered first)
            head = shard.pull(pb.PullRequest(keys=[pl.key for pl in placements]),
                              self._param_sink(placements))
        self._unstage(placements)
        self._note_versions(head)
        return existing

    # -- plumbing --------------------------------------------------------------------------------

    def _fan_out(self, fn: Callable, items: Iterable | None = None) -> list:
        """Run fn on every shard (or item) at once; re-raise the first failure after all finished."""
        items = list(self._shards if items is None else items)
        if len(items) == 1:
            return [fn(items[0])]
        futures = [self._pool.submit(fn, it) for it in items]
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:  # noqa: BLE001 - wait for all, then raise the first
                error = error or exc
        if error is not None:
            raise error
        return results

    def _flat(self, pl: Placement, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)
        return flat[pl.start:pl.stop]

    def _model_values(self, pl: Placement) -> torch.Tensor:
        """The model's own values of a key's parameter, contiguous (a copy for strided parameters)."""
        return self._params_by_name[pl.param].detach().contiguous()

    def _param_sink(self, placements: Sequence[Placement]):
        """Pull destinations: each key's range of the model's own parameter (copied into in place;
        strided parameters receive into their contiguous stand-in, copied over by _unstage)."""
        by_key = {pl.key: pl for pl in placements}

        def sink(head: pb.PullHead) -> dict[tuple[int, int], torch.Tensor]:
            out = {}
            for i, info in enumerate(head.entries):
                pl = by_key[info.key]
                p = self._params_by_name[pl.param]
                dest = self._staging.get(p)
                out[(i, pb.PARAM)] = (p.data if dest is None else dest).view(-1)[pl.start:pl.stop]
            return out
        return sink

    def _unstage(self, placements: Sequence[Placement]) -> None:
        """Copy pulled values of strided parameters from their stand-ins into the model (via .data,
        which leaves the version counter alone: the optimizer, not the user, wrote them)."""
        for p in {self._params_by_name[pl.param] for pl in placements}:
            dest = self._staging.get(p)
            if dest is not None:
                p.data.copy_(dest)

    def _note_versions(self, head: pb.PullHead) -> None:
        for info in head.entries:
            self.versions[info.key] = info.version

    def _mark_synced(self, p: torch.Tensor, user: bool) -> None:
        """The model's p now equals the shards' values; `user`: values the user gave, not pulled ones."""
        slot = self._slot.get(id(p))
        if slot is None:
            slot = self._slot[id(p)] = len(self._plist)
            self._plist.append(p)
            self._seen.append(p._version)
        self._seen[slot] = p._version
        if user:
            self._user_values.add(id(p))
        else:
            self._user_values.discard(id(p))

    def _mark_pulled(self) -> None:
        """After a step: the model holds the shards' values of every parameter (pulled through .data,
        so the version counters seen stay as they were)."""
        self._user_values.clear()

    def _changed_by_user(self, p: torch.Tensor) -> bool:
        """p was changed in place outside the optimizer since it last synchronised it."""
        return p._version != self._seen[self._slot[id(p)]]

    def _hyper(self) -> list[pb.HyperParams]:
        return [hyper_to_proto(_config(g)) for g in self.param_groups]

    def _state_names(self) -> list[str]:
        """torch's Adam state keys this optimizer's parameters have (max_exp_avg_sq with amsgrad)."""
        amsgrad = any(g["amsgrad"] for g in self.param_groups)
        return [n for n in ADAM_STATE if amsgrad or ADAM_STATE[n] != pb.MAX_EXP_AVG_SQ]

    # -- torch.optim.Optimizer API ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group (Lightning's BackboneFinetuning unfreezes layers with it): the new
        parameters are placed after the existing ones (every worker must add the same groups in the
        same order) and registered as at construction."""
        if getattr(self, "_growing", True):
            return super().add_param_group(param_group)
        groups, names = _named_groups([param_group])
        group = groups[0]
        if "param_names" not in group:  # unnamed: continue the param.<i> numbering
            names = [f"param.{len(self._names) + i}" for i in range(len(names))]
        for p, name in zip(group["params"], names):
            if p in self._names:
                raise ValueError(f"parameter {name!r} is already in this optimizer as {self._names[p]!r}")
        _config(dict(self.defaults, **group))
        if self.overlap and self._inflight:
            raise RuntimeError("add_param_group while gradients are in flight (overlap=True): call step() "
                               "first")
        super().add_param_group(group)
        try:
            self._place([self.param_groups[-1]], names)
        except BaseException:
            self.param_groups.pop()
            raise
        if self.overlap:
            self._setup_overlap()
        self.state.invalidate()

    def __deepcopy__(self, memo):
        raise TypeError("a RemoteAdam cannot be copied: its state lives on the shards, and a copy would step "
                        "them too; save opt.state_dict() and load it into another RemoteAdam instead")

    def __reduce_ex__(self, protocol):
        raise TypeError("a RemoteAdam cannot be pickled: its state lives on the shards; save "
                        "opt.state_dict() (torch.save) and load it into a new RemoteAdam instead")

    def _next_seq(self) -> int:
        with self._seq_lock:  # hooks push from autograd's thread, step() from the caller's
            self._seq += 1
            return self._seq

    def _push_head(self, placements: Sequence[Placement], hyper: list[pb.HyperParams],
                   pull_keys: Sequence[str] = ()) -> tuple[pb.PushHead, list[Outgoing]]:
        """The push of these placements' current gradients (all must have one)."""
        entries, grads, flat = [], [], {}
        for i, pl in enumerate(placements):
            p = self._params_by_name[pl.param]
            gi = self._group_of[p]
            entries.append(pb.PushEntry(key=pl.key, version_read=self.versions[pl.key], hyper=gi))
            if p not in flat:
                g = p.grad.reshape(-1) if p.grad.is_contiguous() else p.grad.contiguous().view(-1)
                flat[p] = g.neg() if self.param_groups[gi]["maximize"] else g
            grads.append(Outgoing(i, pb.GRAD, flat[p][pl.start:pl.stop]))
        head = pb.PushHead(client_id=self.push_id, seq=self._next_seq(),
                           wire_dtype=dtype_to_proto(self.wire_dtype), entries=entries, hyper=hyper,
                           pull_dtype=dtype_to_proto(self.pull_dtype), pull_keys=pull_keys)
        return head, grads

    def _note_staleness(self, keys: Iterable[str], reply: pb.PushReply) -> None:
        for key, s in zip(keys, reply.staleness):
            self.last_staleness[key] = s
        if reply.dropped:  # sync: this gradient came after its version had stepped (backup workers)
            self.dropped_pushes += 1

    def _check_wire_range(self, params: Iterable[torch.Tensor]) -> None:
        """Refuse a finite gradient that float16 would turn into inf (the shard would blame the user)."""
        if self.wire_dtype != torch.float16:
            return  # bfloat16 has float32's range
        params = [p for p in params if p.grad.numel()]
        if not params:
            return
        limit = torch.finfo(torch.float16).max
        # one reduction per parameter, one device-to-host read for all (on CUDA: one sync, not one each)
        tops = torch.stack([p.grad.detach().abs().amax().float() for p in params]).tolist()
        for p, top in zip(params, tops):
            if limit < top < float("inf"):
                raise ValueError(f"parameter {self._names[p]!r} has a gradient of magnitude {top:g}, beyond "
                                 f"wire_dtype=torch.float16's range ({limit:g}); scale the loss down or use "
                                 f"wire_dtype=torch.bfloat16")

    def _write_changed(self, params: Iterable[torch.Tensor]) -> None:
        """Write parameters the user changed in place since the last sync to the shards (value only,
        Adam state kept), so the step goes on from them as torch's Adam would. Conditional on the
        versions this worker last saw: another worker's newer step is never overwritten."""
        if params is self._names:  # every parameter, each step: the fast path
            changed = [p for p, seen in zip(self._plist, self._seen) if p._version != seen]
        else:
            changed = [p for p in params if self._changed_by_user(p)]
        if not changed:
            return
        log.info("parameter(s) %s changed in place since the last step; writing them to the shards",
                 [self._names[p] for p in changed][:8])
        keys = [pl for p in changed for pl in self._placed[p]]
        try:
            self._write_keys(keys, None, bounds={pl.key: self.versions[pl.key] for pl in keys})
        except ShardError as exc:
            if exc.reason != ROLLBACK:
                raise
            raise RuntimeError(f"parameter(s) {[self._names[p] for p in changed][:8]} were changed in place "
                               f"since this worker's last step, but other workers stepped them meanwhile "
                               f"({exc.details}); writing your values would undo their steps. Change "
                               f"parameters by hand only where no other worker steps them, or pull first "
                               f"(step() with no gradient) and change them after") from None
        for p in changed:
            self._mark_synced(p, user=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Push every parameter's gradient, apply Adam on the shards, pull fresh values in place."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, name in self._names.items():
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"parameter {name!r} has a sparse gradient; RemoteAdam needs dense ones")
        self.last_staleness = {}  # this step's: a key whose gradient was dropped has none
        self.state.invalidate()
        if self.overlap:
            self._finish_overlapped_step()
            return loss
        self._write_changed(self._names)
        hyper = self._hyper()

        def shard_step(index: int) -> None:
            placements = self._by_shard[index]
            if not placements:
                return
            pushed = [pl for pl in placements if self._params_by_name[pl.param].grad is not None]
            pushed_keys = {pl.key for pl in pushed}
            head, grads = self._push_head(pushed, hyper,
                                          [pl.key for pl in placements if pl.key not in pushed_keys])
            try:
                reply = self._shards[index].push_pull(head, grads, self.wire_dtype,
                                                      self._param_sink(placements))
            except ShardError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    self._reregister(index, exc)
                elif not self._dropped(exc):
                    raise
                reply = self._pull_shard(index)
            self._unstage(placements)
            # Noted here, per shard: when another shard fails, this one's pulled values are in the model.
            self._note_versions(reply)
            self._note_staleness((e.key for e in reply.entries), reply.push)

        self._check_wire_range(p for p in self._names if p.grad is not None)
        try:
            self._fan_out(shard_step, range(len(self._shards)))
        finally:
            self._mark_pulled()
        return loss

    def _pull_shard(self, index: int, min_versions: dict[str, int] | None = None) -> pb.PullHead:
        """Pull every key of one shard into the model (waiting for min_versions where given)."""
        placements = self._by_shard[index]
        if not placements:
            return pb.PullHead()
        request = pb.PullRequest(keys=[pl.key for pl in placements], dtype=dtype_to_proto(self.pull_dtype))
        if min_versions:
            request.min_versions.extend(min_versions.get(pl.key, 0) for pl in placements)
        head = self._shards[index].pull(request, self._param_sink(placements))
        self._unstage(placements)
        return head

    def _reregister(self, index: int, exc: ShardError) -> None:
        """A shard that lost its keys (restarted without a checkpoint): register them again.

        The keys take this worker's current parameters; their Adam state starts afresh. The gradient
        of this step is dropped (counted), since the versions it was computed from are gone.
        """
        log.warning("shard %s lost its keys (%s); registering them again with this worker's values",
                    self._shards[index].address, exc.details)
        self.dropped_pushes += 1
        self._register_shard(self._by_shard[index])

    def _dropped(self, exc: BaseException) -> bool:
        """Whether a failed push was a gradient the shard's policy discarded: re-pull, count, go on."""
        if isinstance(exc, ShardError) and exc.reason in DROP_GRADIENT:
            self.dropped_pushes += 1
            log.info("gradient dropped (%s); pulling fresh parameters", exc.details)
            return True
        return False

    # -- overlap: gradients travel while backward runs -------------------------------------------

    def _setup_overlap(self) -> None:
        """Buckets in reverse registration order (gradients arrive roughly last layer first, as DDP)."""
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
        self._buckets: list[list[torch.Tensor]] = []
        size = 0
        for p in reversed([p for p in self._names if p.requires_grad]):
            if not self._buckets or size + p.numel() * 4 > self._bucket_bytes:
                self._buckets.append([])
                size = 0
            self._buckets[-1].append(p)
            size += p.numel() * 4
        self._bucket_of = {p: b for b, ps in enumerate(self._buckets) for p in ps}
        self._ready: list[set] = [set() for _ in self._buckets]
        self._pushed: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}  # p -> (its .grad, version) sent
        self._inflight: list = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._bucket_of]

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        """Autograd calls this once p's gradient of this backward is complete."""
        if not self._sync:
            return
        if p in self._pushed:
            raise RuntimeError(f"the gradient of {self._names[p]!r} arrived again before step(): with "
                               f"overlap=True gradients are pushed and applied during backward, so call "
                               f"step() after every backward outside no_sync(), even one whose step you "
                               f"meant to skip (GradScaler found inf, a NaN guard); accumulate "
                               f"micro-batches inside `with opt.no_sync():`")
        b = self._bucket_of[p]
        with self._seq_lock:
            self._ready[b].add(p)
            full = len(self._ready[b]) == len(self._buckets[b])
        if full:
            self._launch(self._buckets[b])

    def _launch(self, params: Sequence[torch.Tensor]) -> None:
        """Start pushing these parameters' gradients, one Push per shard, without waiting."""
        self._check_wire_range(params)
        self._write_changed(params)
        self._pushed.update((p, (p.grad, p.grad._version)) for p in params)
        wanted = set(params)
        hyper = self._hyper()
        for index, placements in enumerate(self._by_shard):
            mine = [pl for pl in placements if self._params_by_name[pl.param] in wanted]
            if mine:
                head, grads = self._push_head(mine, hyper)
                future = self._pool.submit(self._shards[index].push, head, grads, self.wire_dtype)
                read = [(pl.key, self.versions[pl.key]) for pl in mine]
                self._inflight.append((index, read, hyper, future))

    def _finish_overlapped_step(self) -> None:
        """Push what the hooks did not (unused or no_sync-accumulated gradients), wait, pull all."""
        hyper = self._hyper()
        changed = sorted({gi for _, _, sent, _ in self._inflight for gi, (a, b) in enumerate(zip(sent, hyper))
                          if a != b})
        if changed:
            log.warning("options of param group(s) %s changed after backward() pushed gradients with "
                        "overlap=True: those pushes used the old options; the change applies from the next "
                        "step", changed)
        # A gradient changed in place after it was sent (clipping, GradScaler.unscale_): the shards
        # applied the unchanged one. Finish the step (the model then equals the shards), then say so.
        altered = [self._names[p] for p, (g, v) in self._pushed.items() if p.grad is not g or g._version != v]
        self._write_changed(self._names)  # parameters changed by hand that no hook pushed this step
        self._launch([p for p in self._names if p.grad is not None and p not in self._pushed])
        inflight, self._inflight = self._inflight, []
        self._pushed.clear()
        self._ready = [set() for _ in self._buckets]
        error, failed = None, set()
        # A pull waits for the versions the pushes produce: at once under async, after the other
        # workers' gradients under sync. Dropped gradients produce none.
        wanted: list[dict[str, int]] = [{} for _ in self._shards]
        for index, keys, _, future in inflight:
            try:
                reply = future.result()
            except BaseException as exc:  # noqa: BLE001 - wait for every push, then raise the first
                if isinstance(exc, ShardError) and exc.code == grpc.StatusCode.NOT_FOUND:
                    self._reregister(index, exc)
                elif not self._dropped(exc):
                    error = error or exc
                    failed.add(index)
                continue
            self._note_staleness((k for k, _ in keys), reply)
            dropped = set(reply.dropped)
            wanted[index].update((k, v + 1) for k, v in keys if k not in dropped)
        # After a failure, still pull every shard that applied something, so that the model and
        # self.versions agree; a shard that only failed is left alone (it may be unreachable).
        pull = [i for i in range(len(self._shards)) if i not in failed or wanted[i]]
        try:
            self._fan_out(lambda i: self._note_versions(self._pull_shard(i, wanted[i])), pull)
        except BaseException as exc:  # noqa: BLE001 - a push's error comes first
            error = error or exc
        finally:
            self._mark_pulled()
        if error is not None:
            raise error
        if altered:
            raise RuntimeError(
                f"the gradient of {altered[:4]} changed after backward() had pushed it (overlap=True sends "
                f"gradients during backward): gradient clipping (clip_grad_norm_, Trainer's max_grad_norm, "
                "Lightning's gradient_clip_val) or GradScaler.unscale_ changed .grad in place afterwards, "
                f"so the shards applied the unchanged gradient. Use overlap=False with them, or transform "
                f"gradients in the loss or in hooks")

    @contextlib.contextmanager
    def no_sync(self):
        """Keep gradients local: backward passes inside accumulate without pushing (overlap=True).

        Use it for all micro-batches but the last; the last backward, outside, pushes the sums. With
        overlap=False nothing is pushed before step() anyway, so this changes nothing there.
        """
        previous, self._sync = self._sync, False
        try:
            yield self
        finally:
            self._sync = previous

    # -- state -----------------------------------------------------------------------------------

    def _fetch_state(self, params: Sequence[torch.Tensor] | None = None
                     ) -> tuple[dict[torch.Tensor, dict[str, Any]], dict[str, int]]:
        """The shards' Adam state of these parameters (all by default), as torch.optim.Adam keeps it,
        and the version of every key read."""
        params = list(self._names) if params is None else list(params)
        names = self._state_names()
        parts = [ADAM_STATE[n] for n in names]
        tensors = {p: {n: torch.zeros(p.shape, dtype=p.dtype, device=p.device) for n in names}
                   for p in params}
        steps: dict[torch.Tensor, set[int]] = {p: set() for p in params}
        versions: dict[str, int] = {}
        placements = [pl for p in params for pl in self._placed[p]]

        def fetch(index: int) -> None:
            by_key = {pl.key: pl for pl in placements if pl.shard == index}
            if not by_key:
                return

            def sink(head):
                out = {}
                for i, info in enumerate(head.entries):
                    pl = by_key[info.key]
                    p = self._params_by_name[pl.param]
                    steps[p].add(int(info.step))
                    versions[info.key] = int(info.version)
                    for n, part in zip(names, parts):
                        out[(i, part)] = tensors[p][n].view(-1)[pl.start:pl.stop]
                return out
            self._shards[index].pull(pb.PullRequest(keys=list(by_key), parts=parts), sink)

        self._fan_out(fetch, range(len(self._shards)))
        state = {}
        for p, ts in tensors.items():
            if len(steps[p]) > 1:
                log.warning("slices of %r are at different steps %s; reporting the smallest",
                            self._names[p], sorted(steps[p]))
            step = min(steps[p])
            if step > 0:  # like torch: a parameter that never took a step has no state
                state[p] = {"step": torch.tensor(float(step)), **ts}
        return state, versions

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.Adam's format, with the state fetched from the shards, plus an "optserve" entry:
        the key versions read and this snapshot's id (load_state_dict of it is a no-op)."""
        state, versions = self._fetch_state()
        shard_state, self.state = self.state, collections.defaultdict(dict, {**state, **self.state.extra})
        try:
            out = super().state_dict()
        finally:
            self.state = shard_state
        snapshot = f"{self.push_id}#{next(self._snapshot_ids)}"
        self._snapshots.append(snapshot)
        out[_META] = {"snapshot": snapshot, "versions": versions}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Write a torch-format state, with the model's current values, to the shards.

        A torch.optim.Adam or AdamW state dict loads too: options its groups lack (weight_decouple,
        absolute, optimized_update) come from this optimizer's defaults (decoupled_weight_decay, where
        it has it, gives weight_decouple), so build it with those that match the source (torch's Adam
        is optimized_update=False). Per parameter:
          * a state this optimizer's own state_dict() returned (accelerate's round trip) writes nothing:
            the shards hold it already, or newer;
          * model values the user set (model.load_state_dict, or values this worker registered) are
            written with the state; a key the shards hold at a newer step is refused (nothing written
            anywhere) unless init="model";
          * model values pulled from the shards are written only with a state of the same step: any
            other state would pair one step's weights with another's moments, and is refused.
        On any failure the previous param_groups are put back and the shards are as they were.
        """
        previous = self.param_groups  # torch's load builds new groups; these stay as they were
        shard_state = self.state
        try:
            super().load_state_dict(state_dict)
            for g in self.param_groups:
                if "weight_decouple" not in g and g.get("decoupled_weight_decay") is not None:
                    g["weight_decouple"] = bool(g["decoupled_weight_decay"])
                for option in ("weight_decouple", "absolute", "optimized_update", "maximize"):
                    g.setdefault(option, self.defaults[option])
                _config(g)
            state = {p: v for p, v in self.state.items() if isinstance(p, torch.Tensor) and p in self._names}
            extra = {k: v for k, v in self.state.items()
                     if not (isinstance(k, torch.Tensor) and k in self._names)}
            self.state = shard_state
            meta = state_dict.get(_META) or {}
            if meta.get("snapshot") not in self._snapshots:
                self._load_state(state, meta.get("versions") or {})
            shard_state.extra = extra  # what the loaded dict and the post-hooks put there, as in torch
        except BaseException:
            self.param_groups = previous
            raise
        finally:
            self.state = shard_state
            shard_state.invalidate()

    def _load_state(self, state: dict[torch.Tensor, dict[str, Any]], versions_read: dict[str, int]) -> None:
        allow_rollback = self.init == "model"
        keys, bounds, steps = [], {}, {}
        for p, name in self._names.items():
            st = state.get(p, {})
            step = int(st["step"]) if "step" in st else 0
            user = id(p) in self._user_values or self._changed_by_user(p)
            for pl in self._placed[p]:
                s = int(versions_read.get(pl.key, step))
                if not user and self.versions[pl.key] != s:
                    raise ValueError(
                        f"load_state_dict: parameter {name!r}: this state is of step {s}, but the model "
                        f"holds the shards' values of step {self.versions[pl.key]} (adopted when RemoteAdam "
                        "was built, or pulled by the last step()); pairing them would step one step's "
                        f"weights with another's moments. Load the model weights saved with this state first "
                        f"(model.load_state_dict), then this state; to resume a checkpoint against shards "
                        f"that are still running, build RemoteAdam(..., init='model')")
                keys.append(pl)
                steps[pl.key] = s
                bounds[pl.key] = None if allow_rollback else s
        if not allow_rollback:
            # All shards are checked first, so a refusal leaves every shard as it was (a push racing
            # in between is still caught by each shard's own check, under its lock).
            current = self._read_versions(keys)
            newer = [(k, current[k], b) for k, b in bounds.items() if current[k] > b]
            if newer:
                k, c, b = newer[0]
                raise ValueError(self._rollback_message(f"key {k!r} is at step {c}, this state at step {b}",
                                                        len(newer)))
        try:
            self._write_keys(keys, state, bounds=bounds, steps=steps)
        except ShardError as exc:
            if exc.reason != ROLLBACK:
                raise
            raise ValueError(self._rollback_message(exc.details, None)) from None
        for p in self._names:
            self._mark_synced(p, user=id(p) in self._user_values or self._changed_by_user(p))

    @staticmethod
    def _rollback_message(detail: str, count: int | None) -> str:
        many = f" ({count} keys)" if count and count > 1 else ""
        return (f"load_state_dict refused: the shards hold newer state than this one{many}: {detail}. "
                f"Loading it would undo steps the shards applied after it was saved (other workers', or "
                f"training that went on). Nothing was written. To resume from it anyway, replacing what "
                f"the shards hold, build RemoteAdam(..., init='model') and load it into that")

    def _read_versions(self, placements: Sequence[Placement]) -> dict[str, int]:
        """The shards' current version of each key (a Register without values answers them)."""
        out: dict[str, int] = {}

        def read(index: int) -> None:
            mine = [pl for pl in placements if pl.shard == index]
            if not mine:
                return
            head = pb.RegisterHead(keys=[pb.KeySpec(name=pl.key, shape=pl.shape, dtype=pb.FLOAT32)
                                         for pl in mine],
                                   shard_index=index, num_shards=len(self._shards), with_values=False)
            for pl, st in zip(mine, self._shards[index].register(head).keys):
                out[pl.key] = int(st.version)
        self._fan_out(read, range(len(self._shards)))
        return out

    def _write_keys(self, placements: Sequence[Placement], state: dict[torch.Tensor, dict[str, Any]] | None,
                    bounds: dict[str, int | None] | None, steps: dict[str, int] | None = None) -> None:
        """SetState these keys: the model's values, and (state not None) step and Adam state from
        `state` (zeros and step 0 where a parameter has none); state None writes values only, keeping
        each key's step (this worker's last seen version) and moments. bounds: each key's max_version
        (a conditional write), or None for none."""
        self._fan_out(lambda i: self._write_shard(i, [pl for pl in placements if pl.shard == i], state,
                                                  bounds, steps), range(len(self._shards)))

    def _write_shard(self, index: int, placements: Sequence[Placement],
                     state: dict[torch.Tensor, dict[str, Any]] | None,
                     bounds: dict[str, int | None] | None = None,
                     steps: dict[str, int] | None = None) -> None:
        """One shard's part of _write_keys (called directly where a fan-out is already running)."""
        if not placements:
            return
        hyper = self._hyper()
        names = self._state_names() if state is not None else []
        entries, items = [], []
        for i, pl in enumerate(placements):
            p = self._params_by_name[pl.param]
            st = (state or {}).get(p, {})
            step = steps[pl.key] if steps else (self.versions[pl.key] if state is None else 0)
            entry = pb.StateEntry(key=pl.key, step=step, hyper=hyper[self._group_of[p]])
            bound = (bounds or {}).get(pl.key)
            if bound is not None:
                entry.max_version = bound
            entries.append(entry)
            items.append(Outgoing(i, pb.PARAM, self._flat(pl, self._model_values(pl))))
            for n in names:
                value = st.get(n)
                value = torch.zeros(p.shape) if value is None else value.detach().to("cpu", torch.float32)
                items.append(Outgoing(i, ADAM_STATE[n], self._flat(pl, value.contiguous())))
        head = pb.SetStateHead(entries=entries, parts=[pb.PARAM] + [ADAM_STATE[n] for n in names])
        reply = self._shards[index].set_state(head, items)
        for pl, v in zip(placements, reply.versions):
            self.versions[pl.key] = v

    def checkpoint(self) -> list[str]:
        """Ask every shard to write a checkpoint now; returns their paths in shard order."""
        return [r.path for r in self._fan_out(lambda s: s.checkpoint())]

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the channels, threads and backward hooks. The shards keep the state."""
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
        for shard in getattr(self, "_shards", ()):
            shard.close()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False)

    def __enter__(self) -> "RemoteAdam":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _config(group: dict[str, Any]) -> AdamConfig:
    """A group's options as the shard will apply them (validated: ValueError names the bad one)."""
    beta1, beta2 = group["betas"]
    return AdamConfig(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                      weight_decay=float(group["weight_decay"]),
                      weight_decouple=bool(group["weight_decouple"]),
                      absolute=bool(group["absolute"]), optimized_update=bool(group["optimized_update"]),
                      amsgrad=bool(group["amsgrad"]))
