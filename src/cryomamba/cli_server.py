"""`cryomamba serve`, `token`, `backup` and `restore`: run and administer a server."""

from __future__ import annotations

import argparse

from rich.markup import escape

import cryomamba as cm

from .cli_ui import UI, UsageError

__all__ = ["run_backup", "run_restore", "run_serve", "run_token"]


def run_serve(args: argparse.Namespace, ui: UI) -> int:
    from .serve import serve

    return serve(args)  # JSON log lines, set up by the server itself (no rich handler)


def run_token(args: argparse.Namespace, ui: UI) -> int:
    from .server.auth import mint_token, parse_duration
    from .server.settings import ServerSettings, load_secret

    settings = ServerSettings(data_dir=args.data_dir, secret_file=args.secret_file)
    try:
        ttl = parse_duration(args.ttl)
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        secret = load_secret(settings, create=False)
        token = mint_token(secret, args.subject, scopes, ttl)
    except cm.CryoMambaError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc), hint="see `cryomamba token --help`") from None
    ui.result(token)
    return 0


def run_backup(args: argparse.Namespace, ui: UI) -> int:
    from .server import backup

    if args.action == "verify":
        if args.backup is None:
            raise UsageError("backup verify needs the backup: `cryomamba backup verify B`")
        path = backup.resolve_backup(args.backup)
        manifest, problems = backup.verify_backup(path)
        for problem in problems:
            ui.err.print(escape(problem), soft_wrap=True)
        if problems:
            raise backup.BackupError(
                f"backup {path} is damaged: {len(problems)} problem(s)",
                hint="restore an older backup; take a new one once the cause is fixed",
            )
        files = manifest["files"].values()
        ui.result(f"ok: {path}: {len(files)} files, {sum(f['size'] for f in files)} bytes verified")
        return 0
    if args.backup is not None or args.to is None:
        raise UsageError(
            "backup needs --to B (or `backup verify B`)",
            hint="cryomamba backup --data-dir D --to B [--keep N]",
        )
    summary = backup.create_backup(args.data_dir, args.to, keep=args.keep)
    for old in summary.removed:
        ui.err.print(f"removed old backup {escape(str(old))}", soft_wrap=True)
    ui.result(str(summary.path))
    return 0


def run_restore(args: argparse.Namespace, ui: UI) -> int:
    from .server.backup import restore_backup

    used = restore_backup(args.backup, args.data_dir)
    ui.result(f"restored {used} into {args.data_dir}")
    return 0
