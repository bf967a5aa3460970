"""`python -m cryomamba.serve`: run the CryoMamba server under uvicorn (see docs/server.md).

Every flag can also be set by an environment variable: `--max-upload-size` is
`CRYOMAMBA_SERVER_MAX_UPLOAD_SIZE`, `--root` takes a list separated by `os.pathsep`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_server_arguments", "main", "run", "serve", "settings_from_args"]

log = logging.getLogger("cryomamba.serve")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size like 512M or 64G, got {text!r}"
        ) from None


def _duration(text: str) -> float:
    from .server.auth import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env(name: str, default=None):
    return os.environ.get(f"CRYOMAMBA_SERVER_{name.upper().replace('-', '_')}", default)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags, each defaulting to its CRYOMAMBA_SERVER_* variable."""

    def opt(flag: str, default, help: str, **kw) -> None:
        p.add_argument(f"--{flag}", default=_env(flag, default), help=help, **kw)

    opt(
        "data-dir",
        "cryomamba-data",
        "folder for raw/, uploads/, artifacts/ and the database",
        type=Path,
    )
    opt("host", "127.0.0.1", "address to bind (default: loopback only)")
    opt("port", "8000", "port to listen on", type=int)
    p.add_argument(
        "--root",
        action="append",
        type=Path,
        default=[Path(r) for r in (_env("root") or "").split(os.pathsep) if r],
        help="a folder whose files jobs may name by server path (repeatable)",
    )
    opt("models-dir", None, "extra models: every sub-folder with a plans.json", type=Path)
    opt("models", "", "comma-separated model names to offer (default: every installed model)")
    opt("devices", "", "comma-separated devices, e.g. cuda:0,cuda:1 (default: all GPUs, or cpu)")
    opt("jobs-per-device", "1", "jobs running at once on each device", type=int)
    opt("executor", "local", "what runs the jobs: local (in this process) or dask (a cluster)")
    opt(
        "cluster",
        None,
        "with --executor dask: a scheduler address (tcp://host:8786) or slurm "
        "(default: a LocalCluster on this machine)",
    )
    opt("part-size", "16M", "default upload part size (8M..32M)", type=_size)
    opt("max-upload-size", "64G", "largest file an upload may announce", type=_size)
    opt("upload-ttl", "24h", "an upload with no activity for this long expires", type=_duration)
    opt("upload-concurrency", "8", "upload parts in flight at once per user", type=int)
    opt("rate-limit", "60", "requests per minute per user (upload parts excepted)", type=int)
    opt("auth-failures", "20", "failed authentications per minute per client address", type=int)
    opt("max-tiles", "250000", "most tiles one job may make (422 at submit beyond)", type=int)
    opt("max-header-size", "64K", "largest request line + headers (431 beyond)", type=_size)
    opt("header-timeout", "10s", "a request's headers must arrive within this", type=_duration)
    opt("idle-timeout", "5s", "an idle keep-alive connection is closed after this", type=_duration)
    opt("max-connections", "1000", "connections and requests at once (503 beyond)", type=int)
    opt("url-ttl", "1h", "how long signed artifact URLs stay valid", type=_duration)
    opt("keepalive", "25", "seconds between WebSocket pings", type=float)
    opt(
        "on-restart",
        "fail",
        "jobs that were running at a crash: fail (retryable) or requeue",
        choices=["fail", "requeue"],
    )
    opt(
        "secret-file",
        None,
        "file with the token/URL signing secret (default: DATA_DIR/"
        "secret.key; $CRYOMAMBA_SECRET wins)",
        type=Path,
    )
    opt("ssl-certfile", None, "TLS certificate (PEM); serve HTTPS with --ssl-keyfile", type=Path)
    opt("ssl-keyfile", None, "TLS private key (PEM)", type=Path)
    p.add_argument(
        "--webhook-allow",
        action="append",
        default=[w for w in (_env("webhook-allow") or "").split(",") if w.strip()],
        help="a URL prefix (https://hooks.example.org/cryo/) or host[:port] jobs may notify "
        "(repeatable; the variable takes a comma-separated list; default: none, no webhooks)",
    )
    opt(
        "webhook-secret-file",
        None,
        "file with the webhook signing key (default: DATA_DIR/webhook.key, made on first boot; "
        "$CRYOMAMBA_WEBHOOK_SECRET wins)",
        type=Path,
    )
    opt("webhook-attempts", "12", "tries per webhook delivery before it is given up", type=int)
    opt("webhook-max-age", "24h", "a webhook not delivered after this is given up", type=_duration)
    opt("webhook-backoff", "2s", "wait after a failed webhook try; doubles", type=_duration)
    opt("webhook-backoff-max", "10m", "longest wait between webhook tries", type=_duration)
    opt("webhook-timeout", "10s", "per webhook try: connect and answer", type=_duration)
    opt("log-level", "info", "debug, info, warning or error")
    opt(
        "trusted-proxies",
        "",
        "comma-separated proxy addresses/networks whose X-Forwarded-For/-Proto are believed "
        "(default: none)",
    )
    opt("audit-log", None, "also append the audit log's JSON lines to this file", type=Path)


def settings_from_args(args: argparse.Namespace):
    """Flags → `ServerSettings` (validated there)."""
    from .server.settings import ServerSettings

    def split(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in (text or "").split(",") if x.strip())

    def typed(value, kind):
        return kind(value) if isinstance(value, str) else value

    return ServerSettings(
        data_dir=Path(args.data_dir),
        host=args.host,
        port=int(args.port),
        roots=tuple(args.root),
        models_dir=Path(args.models_dir) if args.models_dir else None,
        models=split(args.models),
        devices=split(args.devices),
        jobs_per_device=int(args.jobs_per_device),
        executor=args.executor,
        cluster=args.cluster or None,
        part_size=typed(args.part_size, _size),
        max_upload_bytes=typed(args.max_upload_size, _size),
        upload_ttl_s=typed(args.upload_ttl, _duration),
        upload_concurrency=int(args.upload_concurrency),
        rate_limit_per_min=int(args.rate_limit),
        auth_failures_per_min=int(args.auth_failures),
        max_tiles=int(args.max_tiles),
        max_header_bytes=typed(args.max_header_size, _size),
        header_timeout_s=typed(args.header_timeout, _duration),
        idle_timeout_s=typed(args.idle_timeout, _duration),
        max_connections=int(args.max_connections),
        url_ttl_s=typed(args.url_ttl, _duration),
        keepalive_s=float(args.keepalive),
        on_restart=args.on_restart,
        secret_file=Path(args.secret_file) if args.secret_file else None,
        ssl_certfile=Path(args.ssl_certfile) if args.ssl_certfile else None,
        ssl_keyfile=Path(args.ssl_keyfile) if args.ssl_keyfile else None,
        webhook_allow=tuple(w.strip() for w in args.webhook_allow if w.strip()),
        webhook_secret_file=Path(args.webhook_secret_file) if args.webhook_secret_file else None,
        webhook_attempts=int(args.webhook_attempts),
        webhook_max_age_s=typed(args.webhook_max_age, _duration),
        webhook_backoff_s=typed(args.webhook_backoff, _duration),
        webhook_backoff_max_s=typed(args.webhook_backoff_max, _duration),
        webhook_timeout_s=typed(args.webhook_timeout, _duration),
        log_level=args.log_level,
        trusted_proxies=split(args.trusted_proxies),
        audit_log=Path(args.audit_log) if args.audit_log else None,
    )


def run(settings) -> None:
    """Serve until interrupted; uvicorn's own access log stays off (ours omits query strings)."""
    import uvicorn

    from .server import create_app
    from .server.limits import uvicorn_limits
    from .server.logs import configure_logging

    configure_logging(settings.log_level, audit_log=settings.audit_log)
    if settings.models_dir is not None:
        os.environ["CRYOMAMBA_MODELS_DIR"] = str(settings.models_dir)
    if not settings.loopback and not settings.tls:
        log.warning(
            "listening on %s without TLS: tokens and data cross the network in clear text; "
            "pass --ssl-certfile and --ssl-keyfile, or put a TLS proxy in front",
            settings.host,
        )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        ws_ping_interval=None,
        proxy_headers=False,  # the app trusts X-Forwarded-* only from --trusted-proxies
        timeout_graceful_shutdown=10,
        **uvicorn_limits(settings),
    )


def serve(args: argparse.Namespace) -> int:
    """Run the server from parsed flags; the one path of both entry points (`python -m
    cryomamba.serve` and `cryomamba serve`), so both log the same JSON lines. A setting
    the user can fix is one `error:` and one `hint:` line on stderr and exit code 2."""
    from .errors import CryoMambaError

    try:
        run(settings_from_args(args))
    except CryoMambaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if (exc.name or "cryomamba").partition(".")[0] == "cryomamba":
            raise  # our own module is broken: a bug, not a missing extra
        print(
            f"error: the server needs its extra packages ({exc.name} is missing)", file=sys.stderr
        )
        print('hint: from a clone of CryoMamba: pip install ".[server]"', file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .allocator import reuse_freed_memory
    from .threads import quiet_openmp

    quiet_openmp()  # before the first job loads torch
    reuse_freed_memory()  # before any thread allocates
    parser = argparse.ArgumentParser(prog="python -m cryomamba.serve", description=__doc__)
    add_server_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
