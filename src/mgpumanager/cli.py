"""`mgpumanager serve | check-config | demo | deploy-rules`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from . import logs
from .config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgpumanager",
        description="One scheduler and VRAM manager in front of every inference service on a GPU.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--config", type=Path, default=Path("config/consumers.yaml"))
    check = sub.add_parser("check-config", help="validate a registry, list every problem")
    check.add_argument("file", type=Path)
    demo = sub.add_parser(
        "demo", help="simulated 24 GiB GPU + fake Ollama/ComfyUI/mVoice/whisper + the broker"
    )
    demo.add_argument("--config", type=Path, default=Path("config/demo.yaml"))
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="the broker's port; every other piece moves by as much (the simulated GPU to "
        "N+29, the fakes to N+31..N+34); 0: free ports for all, named in the banner",
    )
    rules = sub.add_parser(
        "deploy-rules",
        help="print the polkit rule letting the daemon's user start/stop its command consumers' "
        "systemd units (and no other)",
    )
    rules.add_argument("--config", type=Path, required=True, help="the registry")
    rules.add_argument("--user", default="mgpumanager", help="the daemon's user (mgpumanager)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logs.install()  # a flood of lines any client can cause is cut to a trickle
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            print(
                f"{args.file}: OK ({len(config.consumers)} consumers: "
                f"{', '.join(config.consumers)})"
            )
            return 0
        if args.command == "serve":
            from .app import StartupError, serve

            try:
                return asyncio.run(serve(args.config))
            except StartupError as exc:
                print(f"mgpumanager: {exc}", file=sys.stderr)
                return 1
        if args.command == "deploy-rules":
            from .deploy import RuleError, polkit_rule

            config = load_config(args.config)
            try:
                print(polkit_rule(config, args.user, str(args.config)), end="")
            except RuleError as exc:
                print(f"{args.config}: {exc}", file=sys.stderr)
                return 2
            return 0
        from .app import StartupError
        from .demo import run_demo

        try:
            return asyncio.run(run_demo(args.config, args.port))
        except StartupError as exc:
            print(f"mgpumanager: {exc}", file=sys.stderr)
            return 1
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
