"""RemoteAdam: a torch.optim.Optimizer whose Adam state and update live on optserve shards.

`step()` pushes the gradients of the parameters that have one to every shard at once (one PushPull
round trip per shard) and copies the fresh parameters back into the model in place. The optimizer
holds no Adam state locally (`self.state` stays empty): `state_dict()` fetches it from the shards in
torch's format and `load_state_dict()` writes it back. This module does no tensor math.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import grpc
import torch

from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, WIRE_DTYPES, Outgoing, dtype_to_proto
from optserve.client.partition import DEFAULT_SLICE_ELEMENTS, Placement, partition
from optserve.client.transport import RetryPolicy, Security, ShardClient, ShardError

log = logging.getLogger("optserve.client")

_STATE_PARTS = {"exp_avg": pb.EXP_AVG, "exp_avg_sq": pb.EXP_AVG_SQ, "max_exp_avg_sq": pb.MAX_EXP_AVG_SQ}


def _named_groups(params) -> tuple[list[dict[str, Any]], list[str]]:
    """Normalize params (tensors, (name, tensor) pairs, or groups of either) into plain groups + names.

    Names key the shard map, so every worker must derive the same ones: given names are used as they
    are; unnamed parameters are called `param.<i>` in the order they are given. A tensor given twice
    is refused: it would be two keys stepping one tensor.
    """
    params = list(params)
    if not params:
        raise ValueError("RemoteAdam got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out, names = [], []
    seen: dict[torch.Tensor, str] = {}
    named = None
    for gi, group in enumerate(groups):
        group = dict(group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        tensors = []
        for item in ps:
            is_named = isinstance(item, tuple)
            if named is None:
                named = is_named
            if named != is_named:
                raise ValueError("give all parameters with names (named_parameters()) or none")
            name, p = item if is_named else (f"param.{len(names)}", item)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
            if p in seen:
                raise ValueError(f"parameter {name!r} is the same tensor as {seen[p]!r}: give each parameter once")
            seen[p] = name
            tensors.append(p)
            names.append(name)
        group["params"] = tensors
        out.append(group)
    return out, names


class RemoteAdam(torch.optim.Optimizer):
    """Adam (labml_nn's, DESIGN.md "Semantics") applied by optserve shards.

    params: `model.named_parameters()` (keys are the names), plain parameters, or param groups of
    either with their own options. servers: the shard addresses in shard-index order. Options are
    the seed's; changing a group's option (an lr scheduler) takes effect on the next step.
    Transport options: slice_elements (tensors larger than this are cut across shards),
    chunk_bytes (payload per streamed message), timeout (seconds per call), connect_timeout (seconds
    to wait for each shard at construction), wire_dtype (float32, bfloat16 or float16 gradients),
    pull_dtype (the same choice for the parameters pulled by step(); the shard keeps float32 state
    either way, and registration and state_dict always travel in float32; with float16 a gradient
    beyond its range, 65504, is refused with a ValueError before it is sent), client_id (a name for
    this worker, kept as `self.client_id`, a random id when none is given; pushes carry `self.push_id`,
    "<client_id>/<random>" (or the random client_id itself), unique to this instance, so each is applied once and never taken for another instance's
    retry), retry_budget (seconds within which UNAVAILABLE and DEADLINE_EXCEEDED are retried
    with backoff: a restarting shard is waited for; pushes are retried safely, each applied once),
    data_channel (True: pushes and pulls use the shard's data channel when it announces one, raw
    frames over TCP, see docs/ARCHITECTURE.md; False: everything over gRPC).
    Security: tls=True (or root_certificates=PEM bytes, or OPTSERVE_TLS_CA=path) for TLS;
    certificate_chain and private_key (PEM; or OPTSERVE_TLS_CERT, OPTSERVE_TLS_KEY paths) for mutual
    TLS; token (or OPTSERVE_TOKEN) is sent as
    `authorization: Bearer <token>` on every call.
    overlap=True sends gradients during backward: a hook on each parameter
    (register_post_accumulate_grad_hook) fills buckets of `bucket_bytes` (25 MiB default) in reverse
    registration order, and each full bucket is pushed at once; step() pushes what is left, waits,
    and pulls. For gradient accumulation wrap every micro-batch but the last in `with opt.no_sync():`.
    As with DDP's hooks, a pushed bucket is final: changes between backward() and step() miss the
    buckets already pushed. An option set by hand (lr) applies from the next step (it is logged);
    an in-place change of .grad (clipping, GradScaler.unscale_) races with the send, which reads
    .grad's memory; a step() skipped after backward (GradScaler on inf, a NaN guard) has been
    applied anyway. Transform gradients in the loss or in hooks; then the numbers equal
    overlap=False bitwise.
    """

    def __init__(self, params, servers: Sequence[str], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-16, weight_decay: float = 0.0,
                 weight_decouple: bool = True, absolute: bool = False, optimized_update: bool = True,
                 amsgrad: bool = False, *, slice_elements: int = DEFAULT_SLICE_ELEMENTS,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = 300.0, connect_timeout: float = 30.0,
                 wire_dtype: torch.dtype = torch.float32, pull_dtype: torch.dtype = torch.float32,
                 overlap: bool = False, bucket_bytes: int = 25 * 1024 * 1024, retry_budget: float = 60.0,
                 tls: bool = False, root_certificates: bytes | None = None,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None,
                 token: str | None = None, client_id: str | None = None, data_channel: bool = True):
        servers = [servers] if isinstance(servers, str) else list(servers)
        if not servers:
            raise ValueError("RemoteAdam needs at least one server address")
        for name, dtype in (("wire_dtype", wire_dtype), ("pull_dtype", pull_dtype)):
            if dtype not in WIRE_DTYPES:
                raise ValueError(f"{name} must be one of {list(WIRE_DTYPES)}, got {dtype}")
        if not 4096 <= chunk_bytes <= max_message_bytes - (64 << 10):
            raise ValueError(f"chunk_bytes must be in 4096..{max_message_bytes - (64 << 10)}, got {chunk_bytes}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        weight_decouple=weight_decouple, absolute=absolute,
                        optimized_update=optimized_update, amsgrad=amsgrad)
        groups, names = _named_groups(params)
        for g in groups:
            _config(dict(defaults, **g))  # validate every group's options once, here
        super().__init__(groups, defaults)
        self._fixed = True  # add_param_group is refused from here on
        self.wire_dtype = wire_dtype
        self.pull_dtype = pull_dtype
        self.client_id = client_id or uuid.uuid4().hex
        # Shards apply each (push_id, seq) once: a fresh id per instance keeps a rebuilt or restarted
        # worker with the same client_id (seq starting at 1 again) from being answered as a retry.
        self.push_id = f"{client_id}/{uuid.uuid4().hex[:12]}" if client_id else self.client_id
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._sync = True
        self.overlap = overlap
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self._names = {p: n for p, n in zip((p for g in self.param_groups for p in g["params"]), names)}
        for p, name in self._names.items():
            if p.dtype != torch.float32:
                raise ValueError(f"parameter {name!r} is {p.dtype}; RemoteAdam serves float32 parameters")
            if not p.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; call .contiguous() on it first")
        self._group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}

        retry = RetryPolicy(budget=retry_budget)
        security = Security.from_env(tls, root_certificates, certificate_chain, private_key, token)
        self._shards = [ShardClient(a, timeout=timeout, chunk_bytes=chunk_bytes, max_message_bytes=max_message_bytes,
                                    retry=retry, security=security, data_channel=data_channel) for a in servers]
        self._pool = ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="remote-adam")
        try:
            for i, (shard, hello) in enumerate(zip(self._shards, self._fan_out(
                    lambda s: s.hello(wait=connect_timeout)))):
                if (hello.shard_index, hello.num_shards) != (i, len(servers)):
                    raise ValueError(f"servers[{i}] ({shard.address}) is shard {hello.shard_index} of "
                                     f"{hello.num_shards}, but RemoteAdam was given {len(servers)} "
                                     f"servers: list every shard, in shard-index order")
            params_by_name = {n: p for p, n in self._names.items()}
            self._params_by_name = params_by_name
            self.placements = partition([(n, tuple(params_by_name[n].shape)) for n in names], len(servers),
                                        slice_elements)
            self._by_shard: list[list[Placement]] = [[] for _ in servers]
            for pl in self.placements:
                self._by_shard[pl.shard].append(pl)
            self.versions: dict[str, int] = {}
            self.last_staleness: dict[str, int] = {}  # per key: the staleness of its push in the last step
            self.dropped_pushes = 0  # pushes a policy discarded (ssp over the bound, sync late)
            self._fan_out(self._register_shard, range(len(servers)))
            if overlap:
                self._setup_overlap(bucket_bytes)
        except BaseException:
            self.close()
            raise

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
        return t.view(-1)[pl.start:pl.stop]

    def _param_sink(self, placements: Sequence[Placement]):
        """Pull destinations: each key's range of the model's own parameter (copied into in place)."""
        by_key = {pl.key: pl for pl in placements}

        def sink(head: pb.PullHead) -> dict[tuple[int, int], torch.Tensor]:
            out = {}
            for i, info in enumerate(head.entries):
                pl = by_key[info.key]
                out[(i, pb.PARAM)] = self._flat(pl, self._params_by_name[pl.param].data)
            return out
        return sink

    def _note_versions(self, head: pb.PullHead) -> None:
        for info in head.entries:
            self.versions[info.key] = info.version

    def _register_shard(self, index: int) -> None:
        shard, placements = self._shards[index], self._by_shard[index]
        if not placements:
            return
        specs = [pb.KeySpec(name=pl.key, shape=pl.shape, dtype=pb.FLOAT32, param=pl.param, offset=pl.start,
                            param_shape=self._params_by_name[pl.param].shape) for pl in placements]
        base = dict(keys=specs, shard_index=index, num_shards=len(self._shards))
        reply = shard.register(pb.RegisterHead(**base, with_values=False))
        missing = [pl for pl, st in zip(placements, reply.keys) if not st.exists]
        if missing:
            # Only this worker's values for keys no one has registered; existing keys keep theirs.
            head = pb.RegisterHead(**base | {"keys": [s for s, st in zip(specs, reply.keys) if not st.exists]},
                                   with_values=True)
            shard.register(head, [Outgoing(i, pb.PARAM, self._flat(pl, self._params_by_name[pl.param].detach()))
                                  for i, pl in enumerate(missing)])
        with torch.no_grad():  # adopt the shard's values (another worker's, if it registered first)
            head = shard.pull(pb.PullRequest(keys=[pl.key for pl in placements]), self._param_sink(placements))
        self._note_versions(head)

    def _hyper(self) -> list[pb.HyperParams]:
        out = []
        for g in self.param_groups:
            c = _config(g)
            out.append(pb.HyperParams(lr=c.lr, beta1=c.beta1, beta2=c.beta2, eps=c.eps,
                                      weight_decay=c.weight_decay, weight_decouple=c.weight_decouple,
                                      absolute=c.absolute, optimized_update=c.optimized_update,
                                      amsgrad=c.amsgrad))
        return out

    # -- torch.optim.Optimizer API ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # The shard map is a function of all parameter names, fixed when the optimizer is built.
        if getattr(self, "_fixed", False):
            raise RuntimeError("RemoteAdam's parameters are fixed at construction: the shard map depends "
                               "on all of them; build a new RemoteAdam to add parameters")
        super().add_param_group(param_group)

    def _next_seq(self) -> int:
        with self._seq_lock:  # hooks push from autograd's thread, step() from the caller's
            self._seq += 1
            return self._seq

    def _push_head(self, placements: Sequence[Placement], hyper: list[pb.HyperParams],
                   pull_keys: Sequence[str] = ()) -> tuple[pb.PushHead, list[Outgoing]]:
        """The push of these placements' current gradients (all must have one)."""
        entries, grads = [], []
        for i, pl in enumerate(placements):
            p = self._params_by_name[pl.param]
            entries.append(pb.PushEntry(key=pl.key, version_read=self.versions[pl.key], hyper=self._group_of[p]))
            grads.append(Outgoing(i, pb.GRAD, self._flat(pl, p.grad.reshape(-1))))
        head = pb.PushHead(client_id=self.push_id, seq=self._next_seq(), wire_dtype=dtype_to_proto(self.wire_dtype),
                           entries=entries, hyper=hyper, pull_dtype=dtype_to_proto(self.pull_dtype),
                           pull_keys=pull_keys)
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
        if self.overlap:
            self._finish_overlapped_step()
            return loss
        hyper = self._hyper()

        def shard_step(index: int) -> None:
            placements = self._by_shard[index]
            if not placements:
                return
            pushed = [pl for pl in placements if self._params_by_name[pl.param].grad is not None]
            pushed_keys = {pl.key for pl in pushed}
            head, grads = self._push_head(pushed, hyper, [pl.key for pl in placements if pl.key not in pushed_keys])
            try:
                reply = self._shards[index].push_pull(head, grads, self.wire_dtype, self._param_sink(placements))
            except ShardError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    self._reregister(index, exc)
                elif not self._dropped(exc):
                    raise
                reply = self._pull_shard(index)
            # Noted here, per shard: when another shard fails, this one's pulled values are in the model.
            self._note_versions(reply)
            self._note_staleness((e.key for e in reply.entries), reply.push)

        self._check_wire_range(p for p in self._names if p.grad is not None)
        self._fan_out(shard_step, range(len(self._shards)))
        return loss

    def _pull_shard(self, index: int, min_versions: dict[str, int] | None = None) -> pb.PullHead:
        """Pull every key of one shard into the model (waiting for min_versions where given)."""
        placements = self._by_shard[index]
        if not placements:
            return pb.PullHead()
        request = pb.PullRequest(keys=[pl.key for pl in placements], dtype=dtype_to_proto(self.pull_dtype))
        if min_versions:
            request.min_versions.extend(min_versions.get(pl.key, 0) for pl in placements)
        return self._shards[index].pull(request, self._param_sink(placements))

    def _reregister(self, index: int, exc: ShardError) -> None:
        """A shard that lost its keys (restarted without a checkpoint): register them again.

        The keys take this worker's current parameters; their Adam state starts afresh. The gradient
        of this step is dropped (counted), since the versions it was computed from are gone.
        """
        log.warning("shard %s lost its keys (%s); registering them again with this worker's values",
                    self._shards[index].address, exc.details)
        self.dropped_pushes += 1
        self._register_shard(index)

    def _dropped(self, exc: BaseException) -> bool:
        """Whether a failed push was a gradient the shard's policy discarded: re-pull, count, go on."""
        if isinstance(exc, ShardError) and exc.reason in ("stale", "ahead"):
            self.dropped_pushes += 1
            log.info("gradient dropped (%s); pulling fresh parameters", exc.details)
            return True
        return False

    # -- overlap: gradients travel while backward runs -------------------------------------------

    def _setup_overlap(self, bucket_bytes: int) -> None:
        """Buckets in reverse registration order (gradients arrive roughly last layer first, as DDP)."""
        self._buckets: list[list[torch.Tensor]] = []
        size = 0
        for p in reversed([p for p in self._names if p.requires_grad]):
            if not self._buckets or size + p.numel() * 4 > bucket_bytes:
                self._buckets.append([])
                size = 0
            self._buckets[-1].append(p)
            size += p.numel() * 4
        self._bucket_of = {p: b for b, ps in enumerate(self._buckets) for p in ps}
        self._ready: list[set] = [set() for _ in self._buckets]
        self._pushed: set = set()
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
        self._pushed.update(params)
        wanted = set(params)
        hyper = self._hyper()
        for index, placements in enumerate(self._by_shard):
            mine = [pl for pl in placements if self._params_by_name[pl.param] in wanted]
            if mine:
                head, grads = self._push_head(mine, hyper)
                future = self._pool.submit(self._shards[index].push, head, grads, self.wire_dtype)
                self._inflight.append((index, [(pl.key, self.versions[pl.key]) for pl in mine], hyper, future))

    def _finish_overlapped_step(self) -> None:
        """Push what the hooks did not (unused or no_sync-accumulated gradients), wait, pull all."""
        hyper = self._hyper()
        changed = sorted({gi for _, _, sent, _ in self._inflight for gi, (a, b) in enumerate(zip(sent, hyper))
                          if a != b})
        if changed:
            log.warning("options of param group(s) %s changed after backward() pushed gradients with "
                        "overlap=True: those pushes used the old options; the change applies from the next "
                        "step", changed)
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
        if error is not None:
            raise error

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

    def _fetch_state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """The shards' Adam state per parameter, as torch.optim.Adam keeps it."""
        amsgrad = any(g["amsgrad"] for g in self.param_groups)
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        parts = [_STATE_PARTS[n] for n in names]
        tensors = {p: {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n in names}
                   for p in self._names}
        steps: dict[torch.Tensor, set[int]] = {p: set() for p in self._names}

        def fetch(index: int) -> None:
            placements = self._by_shard[index]
            if not placements:
                return
            by_key = {pl.key: pl for pl in placements}

            def sink(head):
                out = {}
                for i, info in enumerate(head.entries):
                    pl = by_key[info.key]
                    p = self._params_by_name[pl.param]
                    steps[p].add(int(info.step))
                    for n, part in zip(names, parts):
                        out[(i, part)] = self._flat(pl, tensors[p][n])
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
        return state

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.Adam's format, with the state fetched from the shards."""
        self.state.update(self._fetch_state())
        try:
            return super().state_dict()
        finally:
            self.state.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Write a torch-format state (and the model's current parameter values) to the shards.

        A torch.optim.Adam state dict loads too: options its groups lack (weight_decouple, absolute,
        optimized_update) come from this optimizer's defaults, so build it with those that match the
        source (torch's Adam is optimized_update=False). On any failure the previous param_groups are
        put back, so the optimizer stays usable.
        """
        previous = self.param_groups
        try:
            super().load_state_dict(state_dict)
            for g in self.param_groups:
                for option, value in self.defaults.items():
                    g.setdefault(option, value)
                _config(g)
            self._write_state(dict(self.state))
        except BaseException:
            self.param_groups = previous
            raise
        finally:
            self.state.clear()

    def _write_state(self, state: dict[torch.Tensor, dict[str, Any]]) -> None:
        """Set every key's param (the model's current value), step, m and v (and max v) on its shard."""
        hyper = self._hyper()
        amsgrad = any(g["amsgrad"] for g in self.param_groups)
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])

        def write(index: int) -> None:
            placements = self._by_shard[index]
            if not placements:
                return
            entries, items = [], []
            for i, pl in enumerate(placements):
                p = self._params_by_name[pl.param]
                st = state.get(p, {})
                step = int(st["step"]) if "step" in st else 0
                entries.append(pb.StateEntry(key=pl.key, step=step, hyper=hyper[self._group_of[p]]))
                items.append(Outgoing(i, pb.PARAM, self._flat(pl, p.detach())))
                for n in names:
                    value = st.get(n)
                    value = torch.zeros_like(p) if value is None else value.detach().to("cpu", torch.float32)
                    items.append(Outgoing(i, _STATE_PARTS[n], self._flat(pl, value.contiguous())))
            head = pb.SetStateHead(entries=entries, parts=[pb.PARAM] + [_STATE_PARTS[n] for n in names])
            reply = self._shards[index].set_state(head, items)
            for pl, v in zip(placements, reply.versions):
                self.versions[pl.key] = v

        self._fan_out(write, range(len(self._shards)))

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
                      weight_decay=float(group["weight_decay"]), weight_decouple=bool(group["weight_decouple"]),
                      absolute=bool(group["absolute"]), optimized_update=bool(group["optimized_update"]),
                      amsgrad=bool(group["amsgrad"]))
