"""The `optserve` command: serve, status, checkpoint, export, demo, experiment, replay.

Parses arguments and hands on; no logic of its own."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: threads that finish a parallel region sleep at once instead of spinning
# (libgomp's default spins first): a shard serving many small pushes spends less than half the CPU
# per step, and large Adam steps take as long (docs/MEASUREMENTS.md). An explicit OMP_WAIT_POLICY is
# kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from optserve import __version__  # noqa: E402 - after the environment above


def _client_arguments(p: argparse.ArgumentParser) -> None:
    """How the command reaches shards (TLS, token): the same as RemoteAdam's options."""
    p.add_argument("--tls-ca", help="PEM CA to verify the shards (TLS; or OPTSERVE_TLS_CA)")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    p.add_argument("--token-file", help="file holding the bearer token (or OPTSERVE_TOKEN)")


def _security(args: argparse.Namespace):
    from optserve.client.security import Security
    from optserve.net import load_token

    def read(path: str | None) -> bytes | None:
        try:
            return Path(path).read_bytes() if path else None
        except OSError as exc:
            raise ValueError(f"{path}: {exc.strerror or exc}") from None

    token = load_token(args.token_file) or None  # an empty file is an error, as it is for serve
    return Security.from_env(tls=bool(args.tls_ca), root_certificates=read(args.tls_ca),
                             certificate_chain=read(args.tls_cert), private_key=read(args.tls_key),
                             token=token)


_ADDRESSES = "shard addresses (host:port); none given: OPTSERVE_SERVERS or OPTSERVE_SERVERS_FILE"


def _root_parser():
    parser = argparse.ArgumentParser(prog="optserve", description="Optimizer-as-a-service for PyTorch.")
    parser.add_argument("--version", action="version", version=f"optserve {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level on stderr (default INFO)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    return parser, parser.add_subparsers(dest="command", required=True)


def _add_health(sub) -> None:
    health = sub.add_parser("health", help="exit 0 when the shard's grpc.health.v1 status is SERVING "
                                           "(light: imports neither torch nor the server)")
    health.add_argument("address", metavar="ADDR")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds for the call (default 5)")
    _client_arguments(health)


def _command(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option or --log-level's value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser() -> argparse.ArgumentParser:
    from optserve import demo, experiment, replay
    from optserve.server.main import add_serve_arguments

    parser, sub = _root_parser()
    add_serve_arguments(sub.add_parser("serve", help="run one shard"))
    status = sub.add_parser("status", help="print each shard's keys, versions, pushes, staleness, "
                                           "checkpoint, data channel")
    status.add_argument("addresses", nargs="*", metavar="ADDR", help=_ADDRESSES)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_health(sub)
    ckpt = sub.add_parser("checkpoint", help="make each shard write a checkpoint now")
    ckpt.add_argument("addresses", nargs="*", metavar="ADDR", help=_ADDRESSES)
    export = sub.add_parser("export", help="write all parameters (slices reassembled) to a safetensors file")
    export.add_argument("addresses", nargs="*", metavar="ADDR", help="every shard's; " + _ADDRESSES)
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    for p in (status, ckpt, export):
        _client_arguments(p)
    demo.add_arguments(sub.add_parser("demo", help="train digits with 2 in-process shards and 4 workers"))
    experiment.add_arguments(sub.add_parser(
        "experiment", help="compare sync, async, ssp:S and DC-ASGD training with worker and shard processes"))
    replay.add_arguments(sub.add_parser(
        "replay", help="re-apply a shard's --apply-log from a checkpoint; report the first divergence"))
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    light = _command(argv) == "health"  # a health probe parses and runs without torch or the server
    if light:
        parser, sub = _root_parser()
        _add_health(sub)
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if light:
        from optserve.client.probe import health_main
        try:
            return health_main(args.address, _security(args), sys.stdout, args.timeout)
        except ValueError as exc:
            print(f"optserve health: {exc}", file=sys.stderr)
            return 2
    from optserve.client.transport import ShardError
    from optserve.server.main import BindError

    try:
        if args.command in ("status", "checkpoint", "export") and not args.addresses:
            from optserve.client.discovery import servers_from_env
            args.addresses = servers_from_env()
        if args.command == "serve":
            from optserve.server.main import serve_main
            return serve_main(args)
        if args.command == "status":
            from optserve.client.status import status_main
            return status_main(args.addresses, args.json, sys.stdout, _security(args))
        if args.command == "checkpoint":
            from optserve.client.export import checkpoint_main
            return checkpoint_main(args.addresses, _security(args))
        if args.command == "export":
            from optserve.client.export import export_main
            return export_main(args.addresses, args.out, _security(args))
        if args.command == "experiment":
            from optserve import experiment
            return experiment.main(args)
        if args.command == "replay":
            from optserve import replay
            return replay.main(args)
        from optserve import demo
        return demo.main(args)
    except (ValueError, BindError) as exc:  # configuration errors (a port in use too): no traceback
        print(f"optserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except ShardError as exc:
        print(f"optserve {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
