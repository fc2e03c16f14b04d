"""The `fender` command: run, validate, schema, demo."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys

from proxy import __version__
from proxy.config import PolicyError, PolicyIssue, schema_text
from proxy.config.loader import PolicyDocument, read_policy_file

DEFAULT_POLICY = "policies/example.yaml"


def _load_or_report(path: str, unset_env: str = "error") -> PolicyDocument | None:
    """The policy document, or None after printing each problem (FILE:LINE:COL) on stderr."""
    try:
        document = read_policy_file(path, unset_env=unset_env)
    except PolicyError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        return None
    return document


def _machine_issues(document: PolicyDocument) -> list[PolicyIssue]:
    """What `run` would meet on this machine (the same calls it makes), located in the policy."""
    from proxy.ops.auth import resolve_admin_token
    from proxy.ops.preflight import StartupError, check_listener, missing_packages
    from proxy.server.fender import bind_socket

    policy = document.policy
    assert policy is not None  # cmd_validate answered already when the environment was missing
    problems: list[StartupError] = list(missing_packages(policy))
    try:
        resolve_admin_token(policy)
    except StartupError as error:
        problems.append(error)
    for address, label, at in (
        (policy.listen, "proxy listener", "listen"),
        (policy.admin, "admin listener", "admin"),
    ):
        try:
            check_listener(bind_socket, address, label, (at,))
        except StartupError as error:
            problems.append(error)
    from proxy.ops.preflight import tls_file_problems

    problems += [StartupError(message, at) for at, message in tls_file_problems(policy)]
    # The messages name what they are about: no path before them.
    issues = [document.issue(error.at, str(error)) for error in problems]
    return [PolicyIssue(i.source, i.line, i.col, "", i.message) for i in issues]


def _summary(path: str, policy) -> str:
    replicas = sum(len(u.replicas) for u in policy.upstreams.values())
    return (
        f"{path}: ok ({len(policy.routes)} routes, {len(policy.upstreams)} upstreams, {replicas} replicas; "
        f"listen {policy.listen.host}:{policy.listen.port}, admin {policy.admin.host}:{policy.admin.port})"
    )


def cmd_validate(args) -> int:
    problem = _policy_file_problem(args.policy, "validate")
    if problem is not None:
        print(f"fender: {problem}", file=sys.stderr)
        return 1
    # Without --env an unset ${VAR} is only a warning: a CI job lacks the deployment's environment.
    document = _load_or_report(args.policy, unset_env="error" if args.env else "warn")
    if document is None:
        return 1
    for warning in document.warnings:
        print(warning.as_warning(), file=sys.stderr)
    if document.policy is None:
        print(f"{args.policy}: ok as far as it can be checked without the environment variables above")
        return 0
    if args.env:
        issues = _machine_issues(document)
        for issue in issues:
            print(issue, file=sys.stderr)
        if issues:
            return 1
    print(_summary(args.policy, document.policy))
    if args.env:
        policy = document.policy
        checked = [
            f"ports {policy.listen.host}:{policy.listen.port} and {policy.admin.host}:{policy.admin.port} free",
            "admin token readable" if policy.admin_auth is not None else "no admin token to read",
            "packages the policy needs installed",
            "environment references set",
        ]
        print(f"{args.policy}: this machine: {', '.join(checked)}")
        _report_names(policy)
    return 0


def _report_names(policy) -> None:
    """Look up every name of the policy once (only with --env) and say what each gave. A name that
    does not resolve is reported, not an error: `run` starts all the same and keeps asking."""
    if not any(r.needs_lookup for u in policy.upstreams.values() for r in u.replicas):
        return
    from proxy.cluster.dns.report import lookup_report

    for resolved, line in asyncio.run(lookup_report(policy)):
        print(line, file=sys.stdout if resolved else sys.stderr)


def cmd_schema(args) -> int:
    sys.stdout.write(schema_text())
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


async def _run(policy, source: str, demo: bool, engine: str | None = None, warnings=()) -> None:
    from proxy.server.fender import Fender

    demo_servers = []
    if demo:
        demo_servers = await _start_demo(policy)
    fender = Fender(policy, source, engine=engine)
    fender.reloader.current.warnings = list(warnings)  # shown by /admin/config/status
    fender.install_signal_handlers()  # before the listeners accept: a supervisor may signal at once
    await fender.start()
    _tune_gc()
    if demo:
        _print_tour(policy, fender)
    try:
        await fender.run_until_signalled()
    finally:
        for server in demo_servers:
            server.should_exit = True
        for server in demo_servers:
            await server.shutdown()


# Generation-0 collections ran every 700 allocations, i.e. every few requests, and each one
# walked the young objects of in-flight requests. The data path creates few reference cycles,
# so collecting less often costs little memory; what start-up built (modules, models, the
# policy runtime) is moved out of the collector's sight with gc.freeze(). Measured with
# tests/bench: see the commit message.
GC_THRESHOLDS = (50_000, 20, 10)


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _start_demo(policy):
    import uvicorn

    from proxy.config.models import ListenAddress
    from proxy.demo import DemoUpstream, demo_replicas
    from proxy.ops.preflight import bind_listener
    from proxy.server.fender import _Server, bind_socket

    servers = []
    for name, host, port in demo_replicas(policy):
        config = uvicorn.Config(
            DemoUpstream(name), loop="none", lifespan="off", log_config=None, access_log=False, ws="none"
        )
        config.load()
        server = _Server(config)
        server.lifespan = config.lifespan_class(config)
        address = ListenAddress(host=host, port=port)
        await server.startup(sockets=[bind_listener(bind_socket, address, f"demo upstream {name}", ())])
        servers.append(server)
        print(f"demo upstream {name} on {host}:{port}")
    return servers


def _print_tour(policy, fender) -> None:
    base = f"http://{policy.listen.host}:{fender.data_port}"
    admin = f"http://{policy.admin.host}:{fender.admin_port}"
    print(
        f"""
Fender {__version__} is proxying on {base} (admin on {admin}). Try:
  curl -i {base}/catalog/items          # primary replica answers
  curl -i {base}/flaky/orders           # the upstream fails 1 in 3; retries hide it (read Fender-Trace)
  curl -i {base}/nowhere                # no route: Fender's own 404
  curl -s {admin}/metrics | grep fender_requests_total
  curl -s {admin}/admin/routes
  open {admin}/ in a browser             # the live status page
Press Ctrl-C to stop.
""",
        flush=True,
    )


def _policy_file_problem(path: str, command: str = "run") -> str | None:
    """One line when the policy file itself is not there to read (before parsing it)."""
    if not os.path.exists(path):
        return f"policy file {path} not found (give the path: fender {command} POLICY.yaml)"
    if os.path.isdir(path):
        return f"policy file {path} is a directory (give the path of the YAML file: fender {command} POLICY.yaml)"
    return None


def cmd_run(args, demo: bool = False) -> int:
    _configure_logging(args.log_level)
    problem = _policy_file_problem(args.policy)
    if problem is not None:
        print(f"fender: {problem}", file=sys.stderr)
        return 2
    document = _load_or_report(args.policy)
    if document is None:
        print(
            f"fender: not starting: {args.policy} is invalid (the problems are listed above)", file=sys.stderr
        )
        return 2
    from proxy.ops.preflight import StartupError, missing_packages
    from proxy.server.fender import new_event_loop

    policy = document.policy
    warnings = [issue.as_warning() for issue in document.warnings]
    for warning in warnings:
        logging.getLogger("fender").warning("%s", warning)
    try:
        for missing in missing_packages(policy):
            raise missing
        from proxy.ops.preflight import tls_file_problems

        for at, message in tls_file_problems(policy):  # certificate files Fender cannot use
            raise StartupError(message, at)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_run(policy, args.policy, demo, args.server, warnings))
    except StartupError as error:
        # A configuration or environment problem: one line says what and what to do.
        logging.getLogger("fender").debug("start-up failed", exc_info=True)
        print(f"fender: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.log_level == "debug":
            raise
        print(
            f"fender: not starting: unexpected {type(error).__name__}: {error} "
            "(run with --log-level debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fender", description="Fender: a sidecar resilience proxy.")
    parser.add_argument("--version", action="version", version=f"fender {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy on a policy file")
    run.add_argument(
        "policy", nargs="?", default=DEFAULT_POLICY, help=f"policy file (default {DEFAULT_POLICY})"
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--server",
        choices=["uvicorn", "granian"],
        default=None,
        help="HTTP server of the data listener (default: the policy's server.engine, uvicorn)",
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo", help="run the proxy plus built-in demo upstreams for the policy's local replicas"
    )
    demo.add_argument(
        "policy", nargs="?", default=DEFAULT_POLICY, help=f"policy file (default {DEFAULT_POLICY})"
    )
    demo.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    demo.add_argument("--server", choices=["uvicorn", "granian"], default=None, help="as for `fender run`")
    demo.set_defaults(func=lambda a: cmd_run(a, demo=True))

    validate = sub.add_parser("validate", help="check a policy file; print FILE:LINE:COL errors")
    validate.add_argument("policy")
    validate.add_argument(
        "--env",
        action="store_true",
        help="also check this machine: environment variables referred to, token files, free ports, packages",
    )
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the policy JSON Schema (for editor completion)")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
