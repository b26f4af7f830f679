"""The one entry point: `llama-smart-proxy <command>`.

Each command is a `cmd_<name>(args) -> exit code` function. A `UserError` anywhere, also one
raised inside an anyio task group (an ExceptionGroup of them), becomes one line on stderr and its
exit code; no user mistake prints a traceback. Anything else is a bug and keeps its traceback.
The exit codes are defined in supervisor/errors.py, with what each means.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from llama_smart_proxy.schemas.plan import Plan
from llama_smart_proxy.supervisor.config.load import load_config
from llama_smart_proxy.supervisor.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_UNPLACED, RuntimeFailure, UserError

if TYPE_CHECKING:
    from llama_smart_proxy.supervisor.config.load import LoadedConfig
    from llama_smart_proxy.supervisor.planning.prepare import Source

log = logging.getLogger("llama-smart-proxy")

def cmd_validate(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    config = loaded.config
    files = len(loaded.files)
    print(
        f"{loaded.path}: valid, {len(config.models)} model{'s' if len(config.models) != 1 else ''}"
        + (f", {files} files" if files > 1 else "")
    )
    return EXIT_OK


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from llama_smart_proxy.supervisor.service.tinymodel import write_tiny_model

    try:
        path = write_tiny_model(args.path)
    except OSError as exc:
        raise UserError(f"{args.path}: cannot write: {exc.strerror or exc}") from None
    print(f"wrote {path} ({path.stat().st_size} bytes): a tiny random llama model for tests and demos")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from llama_smart_proxy.schemas.generate import schema_texts

    for name, text in schema_texts().items():
        if args.name in (None, name):
            print(text, end="")
    return EXIT_OK


def cmd_inventory(args: argparse.Namespace) -> int:
    from llama_smart_proxy.supervisor.planning.headers import record_headers
    from llama_smart_proxy.supervisor.planning.inventory import describe_inventory, dump_inventory, take_inventory

    models: dict = {}
    warnings: list[str] = []
    if args.config is not None:
        config = load_config(args.config, require_model_files=False).config
        models, warnings = record_headers(config)
    inventory = take_inventory(models=models)
    if warnings:
        inventory = inventory.model_copy(update={"warnings": [*inventory.warnings, *warnings]})
    if args.json:
        print(dump_inventory(inventory), end="")
    else:
        print(describe_inventory(inventory))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from llama_smart_proxy.supervisor.planning.prepare import Source, prepare
    from llama_smart_proxy.supervisor.planning.report import render_plan, verdict

    source = Source(args.config, require_model_files=False)
    loaded = source.load()
    if loaded.config.hosts:
        return plan_fleet(args, replace(source, host_inventories=host_inventories(args.inventory, loaded.config.hosts)), loaded)
    if args.inventory and len(args.inventory) > 1:
        raise UserError("plan: --inventory FILE once; NAME=FILE, several, is for a config with [hosts]")
    source = replace(source, inventory_path=Path(args.inventory[0]) if args.inventory else None)
    prepared = prepare(source, loaded=loaded)
    result = prepared.plan
    outcome = verdict(result, strict=args.strict)
    if args.against is not None:
        from llama_smart_proxy.supervisor.service.reload_diff import diff_plans, refusal

        running = read_running_plan(args.against)
        why = refusal(running, result)
        print(f"Against {args.against}:")
        for line in diff_plans(running, result).describe():
            print(f"  {line}")
        if why is not None:
            print(f"  a reload would be refused: {why}")
            return EXIT_UNPLACED
        return outcome.exit_code
    if args.json:
        print_json(result.model_dump(mode="json"))
        if outcome.exit_code:
            print(f"llama-smart-proxy: plan: {outcome.text}", file=sys.stderr)
    else:
        lines = [f"Plan for {prepared.loaded.path}", f"Machine: {prepared.machine}: {prepared.inventory.message}"]
        print(render_plan(result, lines))
        print(f"Result: {outcome.text}")
    return outcome.exit_code


def host_inventories(values: Sequence[str] | None, hosts: Iterable[str]) -> dict[str, Path]:
    """`--inventory NAME=FILE` values by host name."""
    found: dict[str, Path] = {}
    for value in values or ():
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--inventory {value}: with [hosts], give NAME=FILE (hosts: {', '.join(sorted(hosts))})")
        found[name] = Path(path)
    return found


def plan_fleet(args: argparse.Namespace, source: Source, loaded: LoadedConfig) -> int:
    """`plan` for a config with [hosts]: every host's share, and where each model runs."""
    from llama_smart_proxy.supervisor.planning.fleet_report import fleet_verdict, render_fleet
    from llama_smart_proxy.supervisor.planning.prepare import prepare_fleet

    if args.against is not None:
        raise UserError("plan --against: not for a config with [hosts]; compare one host's plan from `plan --json`")
    fleet = prepare_fleet(source, loaded=loaded).plan
    outcome = fleet_verdict(fleet, strict=args.strict)
    if args.json:
        print_json(fleet.model_dump(mode="json"))
        if outcome.exit_code:
            print(f"llama-smart-proxy: plan: {outcome.text}", file=sys.stderr)
    else:
        header = [f"Fleet plan for {loaded.path}: {len(fleet.hosts)} hosts", ""]
        print(render_fleet(fleet, header, strict=args.strict))
        print(f"Result: {outcome.text}")
    return outcome.exit_code


def cmd_haproxy(args: argparse.Namespace) -> int:
    """An HAProxy config for a fleet: solve it as `plan` does, render, check, install, reload."""
    from llama_smart_proxy.schemas.units import parse_size
    from llama_smart_proxy.supervisor.fleet.haproxy_config import render_haproxy, unroutable_when_escaped
    from llama_smart_proxy.supervisor.fleet.haproxy_reload import DEBIAN_MASTER_SOCKET, DEBIAN_PID_FILE, apply_config
    from llama_smart_proxy.supervisor.fleet.routes import HealthCheck, routes_of_plan
    from llama_smart_proxy.supervisor.planning.prepare import Source, prepare_fleet

    source = Source(args.config, require_model_files=False)
    loaded = source.load()
    if not loaded.config.hosts:
        raise UserError(f"haproxy: {loaded.path} has no [hosts] table: HAProxy is for a fleet of hosts")
    source = replace(source, host_inventories=host_inventories(args.inventory, loaded.config.hosts))
    fleet = prepare_fleet(source, loaded=loaded).plan
    try:
        limit = parse_size(args.body_limit) if args.body_limit is not None else None
        # a host is down 2 failed checks after it stops: the second a quarter interval after the first
        check = HealthCheck(interval_s=args.check_interval, fast_interval_s=args.check_interval / 4, timeout_s=args.check_interval)
        routes = routes_of_plan(
            fleet, loaded.config.proxy, args.listen, body_limit_bytes=limit, run_as=args.run_as,
            stats_socket=args.stats_socket, check=check,
        )  # fmt: skip
    except ValueError as exc:
        raise UserError(f"haproxy: {exc}") from None
    for unplaced in fleet.unplaced:
        print(f"note: {unplaced.reason} (HAProxy answers 503 for it)", file=sys.stderr)
    for name in unroutable_when_escaped(n for m in routes.models for n in m.names):
        print(
            f"note: HAProxy reads the model name {name!r} only from a body that sends it as UTF-8; a client "
            "that escapes it (\\uXXXX) reaches any host, which answers 421 naming the right one",
            file=sys.stderr,
        )
    config = render_haproxy(routes)
    pid_file = master_socket = None
    if args.reload:
        pid_file = args.pid_file or DEBIAN_PID_FILE
        master_socket = args.master_socket or (DEBIAN_MASTER_SOCKET if DEBIAN_MASTER_SOCKET.exists() else None)
    apply_config(config, args.output, pid_file=pid_file, master_socket=master_socket)
    served = sum(1 for m in fleet.models.values() if m.hosts)
    done = "installed and HAProxy reloaded" if args.reload else "installed (HAProxy not reloaded: --reload)"
    print(f"{args.output}: {served} of {len(fleet.models)} models on {len(fleet.hosts)} hosts behind {args.listen}; {done}")
    return EXIT_OK


def read_running_plan(where: str) -> Plan:
    """A plan from `plan --json` output, a saved /status answer, or a running proxy's /status URL."""
    from pydantic import ValidationError

    from llama_smart_proxy.schemas.plan import Plan

    if where.startswith(("http://", "https://")):
        text = _http("GET", where, api_key=None).decode()
    else:
        try:
            text = Path(where).read_text()
        except OSError as exc:
            raise UserError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{where}: not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]  # a /status answer
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{where}: not a plan or a /status answer: {exc.errors()[0]['msg']}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from llama_smart_proxy.supervisor.planning.prepare import Source
    from llama_smart_proxy.supervisor.service.serve import demo_config, serve

    overrides = {"proxy.listen": args.listen} if args.listen else None
    if args.demo:
        if args.config is not None or args.host is not None:
            raise UserError("serve: give --config or --demo, not both (--host is for a config with [hosts])")
        return serve(Source(builtin=demo_config(args.listen)))
    if args.config is None:
        raise UserError("serve: --config FILE is required (or --demo for the built-in tiny model)")
    source = Source(args.config, overrides=overrides, inventory_path=args.inventory, fleet_host=args.host)
    return serve(source, watch=args.watch)


def cmd_admin(args: argparse.Namespace) -> int:
    import os

    base = args.url.rstrip("/")
    if args.action == "reload":
        path = "/admin/reload"
    else:
        if not args.model:
            raise UserError(f"admin {args.action}: name the model")
        path = f"/admin/models/{args.model}/{args.action}"
    key = args.api_key or os.environ.get("LLAMA_SMART_PROXY_API_KEY")
    body = _http("POST", base + path, api_key=key)
    print(body.decode().strip())
    return EXIT_OK


def _http(method: str, url: str, api_key: str | None) -> bytes:
    """One request with the standard library (the CLI needs no HTTP client dependency)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        # 4xx: the request was wrong (a key, a model name); 5xx: the proxy could not act
        error = UserError if exc.code < 500 else RuntimeFailure
        raise error(f"{url}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeFailure(f"{url}: {getattr(exc, 'reason', None) or exc}") from None


def cmd_estimate(args: argparse.Namespace) -> int:
    import os

    from llama_smart_proxy.supervisor.memory.report import estimate_command, estimate_file, render_estimate
    from llama_smart_proxy.supervisor.memory.server_args import parse_server_args

    words = args.words
    if not words:
        raise UserError("estimate: give a GGUF file, or -- and a llama-server command line")
    if len(words) > 1 or words[0].startswith("-"):
        # everything after `--`: a llama-server command line, read with llama-server's defaults
        given = [name for name in ESTIMATE_OPTIONS if getattr(args, name) not in (None, [], ())]
        if given:
            raise UserError(
                f"estimate: --{given[0].replace('_', '-')} is for `estimate FILE`; after -- give llama-server's own flags"
            )
        environment = {k: v for k, v in os.environ.items() if k.startswith("LLAMA_ARG_")}
        result = estimate_command(parse_server_args(words, environment))
        if args.json:
            print_json(result.estimate.model_dump(mode="json"))
        else:
            print(render_estimate(result), end="")
        return EXIT_OK
    result = estimate_file(
        Path(words[0]),
        ctx=args.ctx,
        parallel=args.parallel,
        kv_unified=args.kv_unified,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        flash_attn=args.flash_attn,
        batch=args.batch,
        ubatch=args.ubatch,
        gpu_layers=args.gpu_layers,
        tensor_split=args.tensor_split or (),
        mmproj=args.mmproj,
    )
    if args.json:
        print_json(result.estimate.model_dump(mode="json"))
    else:
        print(render_estimate(result), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-smart-proxy",
        description="Plan, launch and supervise llama-server for many GGUF models behind one "
        "OpenAI-compatible address.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = command("validate", cmd_validate, "check a config file and report every problem")
    p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config")

    p = command("tiny-model", cmd_tiny_model, "write the tiny test model (a few hundred KB)")
    p.add_argument("path", type=Path, help="where to write the GGUF file")

    p = command(
        "inventory",
        cmd_inventory,
        "show the GPUs (through NVML), host RAM and CPUs; --json writes a snapshot for `plan --inventory`",
    )
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.add_argument(
        "--config", "-c", type=Path, help="also record the GGUF header of every model this config names"
    )

    p = command(
        "plan",
        cmd_plan,
        "print where every model would run and why, without starting anything "
        "(exit 3: a model cannot be placed; 4: with --strict, a model fell back to partial or CPU)",
    )
    p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config")
    p.add_argument(
        "--inventory",
        "-i",
        action="append",
        metavar="FILE | NAME=FILE",
        help="plan for this snapshot (from `inventory --json`) instead of this machine; with [hosts], "
        "NAME=FILE replaces that host's snapshot (repeat for several)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the plan as JSON (schemas/plan.schema.json; with [hosts], schemas/fleet-plan.schema.json)",
    )
    p.add_argument(
        "--strict", action="store_true", help="also fail (exit 4) when a model falls back to partial offload or the CPU"
    )
    p.add_argument(
        "--against",
        metavar="RUNNING",
        help="show what a reload to this config would change, against a running plan: a `plan --json` "
        "file, a saved /status answer, or a running proxy's /status URL (exit 3 if it would be refused)",
    )

    p = command("serve", cmd_serve, "start every resident model as planned and serve the OpenAI-compatible address")
    p.add_argument("--config", "-c", type=Path, help="the TOML config")
    p.add_argument("--demo", action="store_true", help="serve the built-in tiny model (no config needed)")
    p.add_argument("--listen", help="host:port to bind, overriding proxy.listen and the environment")
    p.add_argument("--watch", action="store_true", help="reload when the config (or a file it includes) is saved")
    p.add_argument("--inventory", "-i", type=Path, help="plan for this snapshot instead of this machine (testing)")
    p.add_argument(
        "--host",
        metavar="NAME",
        help="with [hosts]: serve this host's share of the fleet (default: the host named like this machine)",
    )

    p = command("admin", cmd_admin, "load, unload or reset a model, or reload the config, on a running proxy")
    p.add_argument("action", choices=["load", "unload", "reset", "reload"])
    p.add_argument("model", nargs="?", help="the model (not for reload)")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the running proxy (default: %(default)s)")
    p.add_argument("--api-key", help="a key from proxy.admin_api_keys (or env LLAMA_SMART_PROXY_API_KEY)")

    p = command(
        "estimate",
        cmd_estimate,
        "show the memory a GGUF model needs, per GPU and on the host: `estimate FILE [options]`, or "
        "`estimate [--json] -- <llama-server arguments>` for a llama-server command line as written "
        "(llama-server's defaults; devices from -ts, --rpc, --device)",
    )
    p.add_argument(
        "words",
        nargs="*",
        metavar="FILE | -- ARGS",
        help="the GGUF file (the first part of a split model), or after -- a llama-server command line",
    )
    p.add_argument("--ctx", type=int, metavar="N", help="context size (-c); 0: the model's own (default 4096)")
    p.add_argument("--parallel", type=int, metavar="P", help="parallel slots (-np, default 1)")
    p.add_argument("--kv-unified", action=argparse.BooleanOptionalAction, default=None,
                   help="one KV cache shared by all slots (default) or one per slot")  # fmt: skip
    cache_types = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]
    p.add_argument("--cache-type-k", choices=cache_types, metavar="T", help="K cache type (default f16)")
    p.add_argument("--cache-type-v", choices=cache_types, metavar="T", help="V cache type (default f16)")
    p.add_argument("--flash-attn", choices=["on", "off", "auto"], help="flash attention (default on)")
    p.add_argument("--batch", type=int, metavar="N", help="logical batch size (-b, default 2048)")
    p.add_argument("--ubatch", type=int, metavar="N", help="physical batch size (-ub, default 512)")
    p.add_argument("--gpu-layers", type=int, metavar="N", help="layers on GPUs, output counted (-ngl); default all, 0: CPU only")
    p.add_argument("--tensor-split", type=_fractions, metavar="A,B,...", help="split across GPUs (-ts), one number per GPU")
    p.add_argument("--mmproj", type=Path, metavar="FILE", help="a vision projector loaded with the model")
    p.add_argument("--json", action="store_true", help="print the Estimate as JSON")

    p = command("haproxy", cmd_haproxy, "write (and reload) an HAProxy config that routes a fleet's models to their hosts")
    p.add_argument("--config", "-c", type=Path, required=True, help="the fleet config (with [hosts])")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where HAProxy listens for clients")
    p.add_argument("--output", "-o", type=Path, required=True, help="the HAProxy config to write (its error files go beside it)")
    p.add_argument("--reload", action="store_true", help="reload HAProxy's master after installing (hitless)")
    p.add_argument("--pid-file", type=Path, help="the master's pid file (default with --reload: /run/haproxy.pid)")
    p.add_argument(
        "--master-socket", type=Path,
        help="the master's CLI socket, to wait for the reload and see it fail (default: /run/haproxy-master.sock if present)",
    )  # fmt: skip
    p.add_argument("--inventory", "-i", action="append", metavar="NAME=FILE", help="use this snapshot for host NAME")
    p.add_argument("--run-as", metavar="USER", help="user and group HAProxy's workers drop to (Debian's: haproxy)")
    p.add_argument("--stats-socket", metavar="PATH", help="HAProxy's admin socket (optional)")
    p.add_argument(
        "--check-interval", type=float, default=2.0, metavar="S",
        help="seconds between health checks of each host's /health (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--body-limit", metavar="SIZE",
        help="largest request body HAProxy reads to find its model (default: the hosts' max_body_size, at most 1 MiB)",
    )  # fmt: skip

    p = command("schema", cmd_schema, "print the JSON Schema of the config, plan or inventory")
    p.add_argument(
        "name", nargs="?", choices=["config", "plan", "inventory", "fleet-plan"],
        help="config, plan, inventory or fleet-plan (default: all)",
    )  # fmt: skip
    return parser


ESTIMATE_OPTIONS = (
    "ctx", "parallel", "kv_unified", "cache_type_k", "cache_type_v", "flash_attn", "batch", "ubatch",
    "gpu_layers", "tensor_split", "mmproj",
)  # fmt: skip
"""`estimate FILE`'s own settings, which a llama-server command line replaces."""


def _fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 3,1, got {text!r}") from None
    if any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, at least one positive, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except (UserError, BaseExceptionGroup) as exc:
        errors = user_errors(exc)
        if errors is None:
            raise  # a bug: keep its traceback
        if any(isinstance(error, KeyboardInterrupt) for error in errors):
            return EXIT_INTERRUPTED
        shown = list(dict.fromkeys(str(error) for error in errors))
        for message in shown:
            print(f"llama-smart-proxy: {message}", file=sys.stderr)
        return errors[0].exit_code  # type: ignore[union-attr]
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def user_errors(exc: BaseException) -> list[BaseException] | None:
    """The UserErrors (and Ctrl-C) an exception is made of, through nested task groups; None when
    any part of it is something else (a bug)."""
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            errors = user_errors(inner)
            if errors is None:
                return None
            found += errors
        return found
    return [exc] if isinstance(exc, (UserError, KeyboardInterrupt)) else None


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
