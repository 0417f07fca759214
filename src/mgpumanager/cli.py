"""`mgpumanager serve | check-config | demo | sim | deploy-rules | init | status | load |
unload | cluster`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from mgpumanager.registry import ConfigError, load_config
from mgpumanager.relay import logs
from mgpumanager.sim.single import add_parser as sim_parser
from mgpumanager.tools.discover import Target, parse_target


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgpumanager",
        description="One scheduler and VRAM manager in front of every inference service on a GPU.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the registry (default /etc/mgpumanager/consumers.yaml, where it exists)",
    )
    check = sub.add_parser("check-config", help="validate a registry, list every problem")
    check.add_argument("file", type=Path)
    demo = sub.add_parser(
        "demo", help="simulated 24 GiB GPU + fake Ollama/ComfyUI/mVoice/whisper + the broker"
    )
    demo.add_argument(
        "--config", type=Path, default=None, help="a registry of your own (default: the demo's)"
    )
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="the broker's port; every other piece moves by as much (the simulated GPU to "
        "N+29, the fakes to N+31..N+34); 0: free ports for all, named in the banner",
    )
    demo.add_argument(
        "--gpus",
        type=int,
        default=1,
        choices=range(1, 9),
        metavar="N",
        help="simulated cards (1-8, default 1); with several, the chat model and speech on the "
        "first, images on the second, each consumer bound to its card",
    )
    sim_parser(sub)
    rules = sub.add_parser(
        "deploy-rules",
        help="print the polkit rule letting the daemon's user start/stop its command consumers' "
        "systemd units (and no other)",
    )
    rules.add_argument("--config", type=Path, required=True, help="the registry")
    rules.add_argument("--user", default="mgpumanager", help="the daemon's user (mgpumanager)")
    init = sub.add_parser(
        "init",
        help="look at this box (GPU, services on their usual ports, systemd units) and write "
        "an annotated registry",
    )
    init.add_argument(
        "--scan",
        action="append",
        default=[],
        type=_target,
        metavar="HOST:PORT",
        help="also probe this address (repeatable; a bare PORT means 127.0.0.1:PORT)",
    )
    init.add_argument(
        "--out",
        type=Path,
        default=Path("config/consumers.yaml"),
        help="where to write the registry (default config/consumers.yaml)",
    )
    init.add_argument(
        "--force", action="store_true", help="replace an existing file (kept as FILE.bak)"
    )
    init.add_argument(
        "--gpu-sim", metavar="URL", help="read the simulated GPU at URL instead of NVML"
    )
    init.add_argument(
        "--total-mib",
        type=int,
        metavar="N",
        help="the card's size, on a box where NVML cannot read it (writes backend: static)",
    )
    init.add_argument(
        "--no-usual-ports",
        action="store_true",
        help="probe only the --scan addresses, not Ollama's, ComfyUI's... usual ports",
    )
    _remote_parsers(sub)
    cluster = sub.add_parser(
        "cluster",
        help="one front per GPU host of a running Ray cluster, each before its own broker "
        "(the `ray` extra; docs/cluster.md)",
    )
    cluster.add_argument(
        "--address", default="auto", help="the Ray cluster to join (default auto: this box's)"
    )
    cluster.add_argument(
        "--broker",
        default="http://127.0.0.1:8770",
        help="each host's broker, as seen on that host (default http://127.0.0.1:8770)",
    )
    cluster.add_argument(
        "--listen",
        default="0.0.0.0:8780",
        help="where each host's front listens (default 0.0.0.0:8780)",
    )
    cluster.add_argument(
        "--period-s", type=float, default=1.0, help="how often each front reads its broker"
    )
    cluster.add_argument(
        "--local",
        type=int,
        metavar="N",
        help="a local Ray cluster of N simulated hosts on this machine, to try it",
    )
    return parser


def _target(text: str) -> Target:
    try:
        return parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _remote_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands against a running broker (remote.py); the token comes from
    $MGPUMANAGER_TOKEN."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--url", help="the broker (default: the registry's `listen`, else http://127.0.0.1:8770)"
    )
    where.add_argument(
        "--config",
        type=Path,
        help="the registry whose `listen` to use (default: config/consumers.yaml, then "
        "/etc/mgpumanager/consumers.yaml)",
    )
    status = sub.add_parser(
        "status", parents=[where], help="memory, consumers, queue and evictions of a broker"
    )
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    for action in ("load", "unload"):
        one = sub.add_parser(action, parents=[where], help=f"{action} one consumer now")
        one.add_argument("name", help="the consumer, as the registry names it")


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the daemon's `main` on Python's own loop, or on uvloop when MGPUMANAGER_LOOP=uvloop
    asks for it (the `fast` extra). Not the default: the proxy benchmark found no clear gain
    for the broker on it (bench/README.md)."""
    wanted = os.environ.get("MGPUMANAGER_LOOP", "asyncio") or "asyncio"
    if wanted == "uvloop":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            main.close()
            raise SystemExit(
                "mgpumanager: MGPUMANAGER_LOOP=uvloop, but uvloop is not installed "
                "(pip install 'mgpumanager[fast]')"
            ) from None
        result: int = uvloop.run(main)
        return result
    if wanted != "asyncio":
        main.close()
        raise SystemExit(f"mgpumanager: MGPUMANAGER_LOOP must be asyncio or uvloop, not {wanted!r}")
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logs.install()  # a flood of lines any client can cause is cut to a trickle
    if args.command in ("status", "load", "unload"):
        from mgpumanager.tools.remote import run

        try:
            return run(args)
        except KeyboardInterrupt:
            return 0 if args.command == "status" else 130
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            from mgpumanager.upstreams.containers import check_containers

            if not check_containers(config, args.file):
                return 2
            from mgpumanager.upstreams.devices_check import check_devices, checks_devices

            if checks_devices(config) and not asyncio.run(check_devices(config, args.file)):
                return 2
            print(
                f"{args.file}: OK ({len(config.consumers)} consumers: "
                f"{', '.join(config.consumers)})"
            )
            from mgpumanager.tools.browser_notes import browser_notes

            print("\n".join(browser_notes(config)))
            return 0
        if args.command == "serve":
            from mgpumanager.daemon import StartupError, serve
            from mgpumanager.registry.paths import NoRegistry, serve_registry

            try:
                return run_loop(serve(serve_registry(args.config)))
            except NoRegistry as exc:
                print(f"mgpumanager serve: {exc}", file=sys.stderr)
                return 2
            except StartupError as exc:
                print(f"mgpumanager: {asyncio.run(port_taken(exc))}", file=sys.stderr)
                return 1
        if args.command == "deploy-rules":
            from mgpumanager.tools.deploy import RuleError, polkit_rule

            config = load_config(args.config)
            try:
                print(polkit_rule(config, args.user, str(args.config)), end="")
            except RuleError as exc:
                print(f"{args.config}: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.command == "sim":
            from mgpumanager.sim.single import run as run_sim

            return run_loop(run_sim(args))
        if args.command == "init":
            from mgpumanager.tools.init import main_init

            return main_init(args)
        if args.command == "cluster":
            return _cluster(args)
        from mgpumanager.daemon import StartupError
        from mgpumanager.registry.paths import demo_registry
        from mgpumanager.tools.demo import run_demo

        try:
            return run_loop(run_demo(args.config or demo_registry(), args.port, args.gpus))
        except StartupError as exc:
            print(f"mgpumanager: {exc}", file=sys.stderr)
            return 1
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _cluster(args: argparse.Namespace) -> int:
    from mgpumanager.cluster.ray_app import RayMissing, import_ray, run_cluster, run_local

    try:
        import_ray()
    except RayMissing as exc:
        print(f"mgpumanager cluster: {exc}", file=sys.stderr)
        return 2
    if args.local is not None:
        if args.local < 1:
            print("mgpumanager cluster: --local needs N >= 1", file=sys.stderr)
            return 2
        return run_loop(run_local(args.local, args.period_s))
    token = os.environ.get("MGPUMANAGER_TOKEN") or None
    return run_cluster(args.address, args.broker, args.listen, args.period_s, token)


async def port_taken(exc: Exception) -> str:
    """`exc` as one line, saying so where the port it could not bind is another broker's
    (the daemon says which key asked for the port; who holds it is the tools' to tell)."""
    from mgpumanager.daemon import ListenError
    from mgpumanager.tools.port_holder import broker_holds

    cause = exc.__cause__
    if isinstance(cause, ListenError) and await broker_holds(cause.address):
        return str(exc).replace(
            "; change", ": another mgpumanager runs there; stop it, or change", 1
        )
    return str(exc)


if __name__ == "__main__":
    raise SystemExit(main())
