"""The `optserve` command: serve, status, checkpoint, export, demo, experiment.

Parses arguments and hands on; no logic of its own."""
from __future__ import annotations

import argparse
import logging
import sys

from optserve import __version__
from optserve.client.transport import ShardError


def build_parser() -> argparse.ArgumentParser:
    from optserve import demo
    from optserve.server.main import add_serve_arguments

    parser = argparse.ArgumentParser(prog="optserve", description="Optimizer-as-a-service for PyTorch.")
    parser.add_argument("--version", action="version", version=f"optserve {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level on stderr (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="run one shard"))
    status = sub.add_parser("status", help="print each shard's keys, versions, pushes, staleness")
    status.add_argument("addresses", nargs="+", metavar="ADDR", help="shard addresses (host:port)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ckpt = sub.add_parser("checkpoint", help="make each shard write a checkpoint now")
    ckpt.add_argument("addresses", nargs="+", metavar="ADDR", help="shard addresses (host:port)")
    export = sub.add_parser("export", help="write all parameters (slices reassembled) to a safetensors file")
    export.add_argument("addresses", nargs="+", metavar="ADDR", help="every shard's address (host:port)")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    demo.add_arguments(sub.add_parser("demo", help="train digits with 2 in-process shards and 4 workers"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from optserve.server.main import serve_main
            return serve_main(args)
        if args.command == "status":
            from optserve.client.status import status_main
            return status_main(args.addresses, args.json, sys.stdout)
        if args.command == "checkpoint":
            from optserve.client.export import checkpoint_main
            return checkpoint_main(args.addresses)
        if args.command == "export":
            from optserve.client.export import export_main
            return export_main(args.addresses, args.out)
        from optserve import demo
        return demo.main(args)
    except ValueError as exc:  # configuration errors: say what was wrong, no traceback
        print(f"optserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except ShardError as exc:
        print(f"optserve {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
