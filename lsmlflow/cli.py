"""ls-mlflow: serve an MLflow model to Label Studio from the shell.

    ls-mlflow serve                                   # one backend on 127.0.0.1:9090
    ls-mlflow orchestrator                            # or one backend per model, behind one URL
    ls-mlflow configure --model models:/detector@champion --pre-hook myhooks.py:pre --post-hook myhooks.py:post
    ls-mlflow connect --project 7                     # Label Studio: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY
    ls-mlflow status
    ls-mlflow check --model ... --post-hook ... --label-config config.xml image.png

Every command that talks to a server takes --url (default $LS_MLFLOW_URL or http://127.0.0.1:9090).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .client import Client, Served
from .errors import ClientError
from .labelstudio import connect_project
from .pickling import load_reference
from .settings import ClientSettings


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _label_config(value: str | None) -> str | None:
    if not value:
        return None
    path = Path(value)
    return value if value.lstrip().startswith("<") or not path.is_file() else path.read_text()


def _field(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    try:
        return key, json.loads(raw)  # numbers, booleans, objects
    except ValueError:
        return key, raw


def _client(args: argparse.Namespace, settings: ClientSettings) -> Client:
    return Client(args.url, token=args.token or settings.configure_token or None, basic_auth=settings.basic_auth)


# -- servers -----------------------------------------------------------------------------------------

def _exec(argv: list[str], env: dict[str, str]) -> int:
    """Become the server (signals and exit status are then the server's own)."""
    _say(" ".join(argv[1:]))
    os.execve(argv[0], argv, env)
    return 0  # not reached


def _env_default(name: str, fallback: str) -> str:
    """A server option's default: the environment's, as a container sets it ($PORT, $HOST), else ours;
    argparse converts it (a $PORT that is not a number is an error naming --port)."""
    return os.environ.get(name) or fallback


def cmd_serve(args: argparse.Namespace, settings: ClientSettings) -> int:
    env = {**os.environ, "HOST": args.host, "PORT": str(args.port)}
    if args.workers:
        env["WORKERS"] = str(args.workers)
    if args.model_dir:
        env["MODEL_DIR"] = str(Path(args.model_dir).resolve())
    return _exec([sys.executable, "-m", "gunicorn", "-c", "python:backend.web.gunicorn_conf", "wsgi:app"], env)


def cmd_orchestrator(args: argparse.Namespace, settings: ClientSettings) -> int:
    env = {**os.environ, "HOST": args.host}
    if args.state_dir:
        env["ORCHESTRATOR_DIR"] = str(Path(args.state_dir).resolve())
    if args.driver:
        env["ORCHESTRATOR_DRIVER"] = args.driver
    if args.on_exit:
        env["ORCHESTRATOR_ON_EXIT"] = args.on_exit
    argv = [sys.executable, "-m", "flask", "--app", "orchestrator", "run", "--host", args.host, "--port", str(args.port)]
    return _exec(argv, env)


# -- client commands ----------------------------------------------------------------------------------

def _connect(served: Served, args: argparse.Namespace, settings: ClientSettings) -> None:
    label_studio_url = args.label_studio_url or settings.label_studio_url
    api_key = args.api_key or settings.label_studio_api_key
    if not label_studio_url or not api_key:
        raise ClientError("connect needs Label Studio's URL and an API key",
                          "Set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a Personal Access Token), or pass "
                          "--label-studio-url and --api-key.")
    backend_url = served.url
    if args.backend_url:  # the server's address as Label Studio reaches it; the model's path is kept
        own = args.url.rstrip("/")
        path = served.url[len(own):] if served.url.startswith(own) else ""
        backend_url = args.backend_url.rstrip("/") + (path or "/")
    connection = connect_project(args.project, backend_url, label_studio_url=label_studio_url, api_key=api_key,
                                 title=args.title, interactive=args.interactive, retrieve=not args.no_retrieve,
                                 model_version=served.model_version, basic_auth=settings.basic_auth, progress=_say)
    print(json.dumps({"project": connection.project, "ml_backend": connection.ml_backend_id, "url": connection.url,
                      "created": connection.created, "interactive": connection.interactive,
                      "predictions": connection.predictions}))


def cmd_configure(args: argparse.Namespace, settings: ClientSettings) -> int:
    pre = load_reference(args.pre_hook, "--pre-hook") if args.pre_hook else None
    post = load_reference(args.post_hook, "--post-hook") if args.post_hook else None
    fields = dict(args.field or [])
    if args.batch_size:
        fields["batch_size"] = args.batch_size
    served = _client(args, settings).configure(args.model, pre_hook=pre, post_hook=post,
                                               label_config=_label_config(args.label_config), wait=args.wait,
                                               progress=_say, **fields)
    print(json.dumps({"url": served.url, "model_uri": served.model_uri, "model_version": served.model_version,
                      "backend_id": served.backend_id}))
    if args.project is not None:
        _connect(served, args, settings)
    else:
        _say(f"connect a Label Studio project to {served.url}: ls-mlflow connect --url {args.url} "
             f"--model {args.model} --project <id>")
    return 0


def cmd_connect(args: argparse.Namespace, settings: ClientSettings) -> int:
    served = _client(args, settings).served(args.model)
    _connect(served, args, settings)
    return 0


def _short(text: Any, width: int) -> str:
    text = "" if text is None else str(text).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _push_summary(push: dict | None) -> str:
    """``on: 9620 stored, 380 left, 2 failed (41.3/s)``, or ``off: why``: how far writing predictions into Label Studio is."""
    if not push:
        return ""
    if push.get("mode") != "on":
        return f"off: {push.get('why', '')}"
    totals = {key: sum(p.get(key, 0) for p in (push.get("projects") or {}).values()) for key in ("stored", "left", "failed")}
    return (f"on: {totals['stored']} stored, {totals['left']} left, {totals['failed']} failed"
            + (f" ({push['rate_per_s']}/s)" if push.get("rate_per_s") else ""))


def _memory(record: dict) -> str:
    """What a backend holds now (PSS), or, asleep, what waking it will take."""
    held = record.get("memory_now_bytes") if record.get("state") != "sleeping" else record.get("memory_bytes")
    return f"{held / (1 << 20):.0f} MiB" if held else ""


def cmd_status(args: argparse.Namespace, settings: ClientSettings) -> int:
    client = _client(args, settings)
    if client.is_orchestrator():
        rows = []
        for record in client.backends():
            health = client.backend(record["id"], 0).get("health") or {}
            training = (health.get("training") or {}).get("last") or {}
            rows.append({
                "id": record["id"], "state": record.get("state"), "model": record.get("model", {}).get("model_uri"),
                "version": health.get("model_version") or record.get("model_version"), "memory": _memory(record),
                "url": record.get("label_studio_url"),
                "training": training.get("outcome") or (health.get("training") or {}).get("state"),
                "push": _push_summary(health.get("push")), "last_error": record.get("last_error"),
            })
        if args.json:
            print(json.dumps({"orchestrator": args.url, "backends": rows}, indent=2))
            return 0
        print(f"orchestrator at {args.url}: {len(rows)} backend(s)")
        columns = (("id", 14), ("state", 9), ("model", 32), ("version", 18), ("memory", 10), ("training", 10), ("push", 34),
                   ("url", 40), ("last_error", 60))
        print("  ".join(name.upper().ljust(width) for name, width in columns).rstrip())
        for row in rows:
            print("  ".join(_short(row[name], width).ljust(width) for name, width in columns).rstrip())
        return 0
    health = client.health()
    summary = {key: health.get(key) for key in ("configured", "loading", "model_uri", "model_version", "flavor", "device",
                                                "pre_hook", "post_hook", "antenna_pipeline")}
    summary["training"] = health.get("training")
    summary["push"] = _push_summary(health.get("push"))
    summary["last_error"] = health.get("last_error")
    if args.json:
        print(json.dumps({"backend": args.url, **summary}, indent=2, default=str))
        return 0
    print(f"backend at {args.url}")
    for key, value in summary.items():
        if value not in (None, "", {}):
            print(f"  {key:17} {_short(json.dumps(value) if isinstance(value, (dict, list)) else value, 100)}")
    return 0


def cmd_check(args: argparse.Namespace, settings: ClientSettings) -> int:
    from hooks.check import run_check

    return run_check(args)


# -- the parser ----------------------------------------------------------------------------------------

def parser(settings: ClientSettings | None = None) -> argparse.ArgumentParser:
    settings = settings or ClientSettings.from_env()
    cli = argparse.ArgumentParser(prog="ls-mlflow", description=__doc__.split("\n\n")[0],
                                  epilog="Each command has --help. Errors say what happened and how to fix it.")
    commands = cli.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def talking(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--url", default=settings.url, help="the backend or orchestrator (default: %(default)s; $LS_MLFLOW_URL)")
        sub.add_argument("--token", default="", help="its CONFIGURE_TOKEN (default: $CONFIGURE_TOKEN)")
        return sub

    def label_studio_options(sub: argparse.ArgumentParser, required: bool) -> None:
        group = sub.add_argument_group("Label Studio")
        group.add_argument("--project", type=int, required=required, default=None,
                           help="the project's id (the number in its URL)" + ("" if required else "; connects it after configuring"))
        group.add_argument("--label-studio-url", default="", help="default: $LABEL_STUDIO_URL")
        group.add_argument("--api-key", default="", help="a Personal Access Token (default: $LABEL_STUDIO_API_KEY)")
        group.add_argument("--backend-url", default="",
                           help="the server's address as Label Studio reaches it, where that differs from --url "
                           "(compose: http://orchestrator:9090); the model's path is kept")
        group.add_argument("--title", default="MLflow", help="the ML backend's title in Label Studio")
        group.add_argument("--interactive", action="store_true", help="turn on interactive pre-annotation")
        group.add_argument("--no-retrieve", action="store_true", help="do not ask for predictions of the project's tasks now")

    serve = commands.add_parser("serve", help="run one backend (gunicorn wsgi:app)",
                                description="Run one backend. Configure it with `ls-mlflow configure`.")
    serve.add_argument("--host", default=_env_default("HOST", "127.0.0.1"), help="bind address (default: $HOST or "
                       "127.0.0.1; beyond loopback, configure needs CONFIGURE_TOKEN or BASIC_AUTH_USER/PASS)")
    serve.add_argument("--port", type=int, default=_env_default("PORT", "9090"), help="default: $PORT or 9090")
    serve.add_argument("--workers", type=int, default=0, help="gunicorn workers (default: $WORKERS or 1)")
    serve.add_argument("--model-dir", default="", help="where the configuration is kept (default: $MODEL_DIR or ./model_dir)")
    serve.set_defaults(run=cmd_serve)

    orchestrator = commands.add_parser("orchestrator", help="run the orchestrator: one backend per model",
                                       description="Run the orchestrator (flask run). Ctrl-C stops its backends; "
                                       "--on-exit keep leaves them for the next start.")
    orchestrator.add_argument("--host", default=_env_default("HOST", "127.0.0.1"), help="default: $HOST or 127.0.0.1")
    orchestrator.add_argument("--port", type=int, default=_env_default("PORT", "9090"), help="default: $PORT or 9090")
    orchestrator.add_argument("--state-dir", default="", help="default: $ORCHESTRATOR_DIR or ./orchestrator_state")
    orchestrator.add_argument("--driver", choices=("process", "docker", "ray"), default=None)
    orchestrator.add_argument("--on-exit", choices=("stop", "keep"), default=None)
    orchestrator.set_defaults(run=cmd_orchestrator)

    configure = talking("configure", "serve an MLflow model with your hooks, and wait until it serves")
    configure.add_argument("--model", required=True, help="models:/name/version, models:/name@alias, runs:/..., a path")
    configure.add_argument("--pre-hook", default="", help="module:function or path/to/file.py:function (default: identity)")
    configure.add_argument("--post-hook", default="", help="module:function or path/to/file.py:function")
    configure.add_argument("--label-config", default="", help="the labeling config (a file or the XML); for Antenna")
    configure.add_argument("--batch-size", type=int, default=0)
    configure.add_argument("--field", type=_field, action="append", metavar="KEY=VALUE",
                           help="any other configure field, e.g. --field loader=native --field tracking_uri=...")
    configure.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a big model (default: %(default)s)")
    label_studio_options(configure, required=False)
    configure.set_defaults(run=cmd_configure)

    connect = talking("connect", "connect a Label Studio project to a served model and retrieve predictions")
    connect.add_argument("--model", default=None, help="which model, on an orchestrator with several")
    label_studio_options(connect, required=True)
    connect.set_defaults(run=cmd_connect)

    status = talking("status", "what is served: backends, versions, training, last errors")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)

    from hooks.check import add_check_arguments

    check = commands.add_parser("check", help="run your hooks and model on files here, and validate the predictions",
                                description="Run pre_hook -> model -> post_hook on local files or tasks, as a backend "
                                "would, and say whether Label Studio would accept the predictions.")
    add_check_arguments(check)
    check.set_defaults(run=cmd_check)
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    settings = ClientSettings.from_env()
    args = parser(settings).parse_args(argv)
    try:
        return int(args.run(args, settings) or 0)
    except ClientError as exc:
        print(f"error: {exc.error}", file=sys.stderr)
        if exc.detail:
            print(f"  fix: {exc.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
