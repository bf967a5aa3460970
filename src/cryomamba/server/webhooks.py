"""Job webhooks: which destinations are allowed, how a delivery is signed, and the sender.

A job may name a `notify_url`. When it reaches a terminal state (completed, failed,
canceled) the database writes one row to the `webhooks` outbox in the same transaction
as the state (server/storage.py), so no ending is lost to a crash. `WebhookSender`, a
thread started and stopped with the app, POSTs each due row's job record (without signed
artifact URLs: those are credentials) and retries with exponential backoff and jitter
until the receiver answers 2xx, or gives up after `--webhook-attempts` tries or
`--webhook-max-age` (recorded on the row). Delivery is at least once: a receiver may see a
delivery twice (the same `X-CryoMamba-Delivery` id) if the server dies between its 2xx and
our write.

Each request carries `X-CryoMamba-Signature: t=<unix seconds>,v1=<hex>`, the hex
HMAC-SHA256 of `f"{t}." + body` under the webhook key (not the server's token secret, so
receivers can hold it); a receiver rejects a bad signature or an old `t` (replays).

Only http and https URLs the operator allows (`--webhook-allow`: URL prefixes or
host[:port] patterns; none by default) are accepted, checked at submit (422
`webhook_not_allowed`) and again before each attempt; redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from .errors import ApiError
from .settings import ServerSettings, _long_enough
from .storage import Storage

__all__ = [
    "AllowRule",
    "WebhookSender",
    "check_url",
    "load_webhook_secret",
    "parse_allow",
    "public_record",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-CryoMamba-Signature"
DELIVERY_HEADER = "X-CryoMamba-Delivery"
EVENT_HEADER = "X-CryoMamba-Event"
MAX_URL_LENGTH = 2048
POLL_S = 0.25  # how often the sender looks for due deliveries
_DEFAULT_PORTS = {"http": 80, "https": 443}


# -- allowed destinations -------------------------------------------------------------------
@dataclass(frozen=True)
class AllowRule:
    """One `--webhook-allow` entry: a URL prefix (`https://hooks.example.org/cryo/`) or a
    host pattern (`hooks.example.org`, `*.example.org`, `127.0.0.1:9000`)."""

    text: str
    host: str  # lower case; "*.example.org" matches its sub-domains only
    port: int | None  # None: any port (host patterns only)
    scheme: str | None = None  # URL prefixes only
    path: str = ""  # URL prefixes only: matches this path and what lies below it

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if self.host.startswith("*."):
            if not host.endswith(self.host[1:]) or host == self.host[2:]:
                return False
        elif host != self.host:
            return False
        if self.port is not None and port != self.port:
            return False
        if self.scheme is None:
            return True
        if scheme != self.scheme:
            return False
        prefix = self.path.rstrip("/")
        return path == prefix or path.startswith(prefix + "/")


def parse_allow(entries: Sequence[str]) -> tuple[AllowRule, ...]:
    """`--webhook-allow` entries → rules; `ConfigError` for one that names no host."""
    rules = []
    for raw in entries:
        text = raw.strip()
        if not text:
            continue
        bad = ConfigError(
            f"--webhook-allow {text!r} is neither an http(s) URL prefix nor a host[:port]",
            hint="e.g. --webhook-allow https://hooks.example.org/cryomamba/ or "
            "--webhook-allow hooks.example.org:8443",
        )
        try:
            if "://" in text:
                parts = urlsplit(text)
                if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.query:
                    raise bad
                rules.append(
                    AllowRule(
                        text,
                        parts.hostname.lower(),
                        parts.port or _DEFAULT_PORTS[parts.scheme],
                        parts.scheme,
                        parts.path or "/",
                    )
                )
            else:
                parts = urlsplit("//" + text)
                host = (parts.hostname or "").lower()
                if not host or parts.path or "*" in host.removeprefix("*."):
                    raise bad
                rules.append(AllowRule(text, host, parts.port))
        except ValueError:  # a port that is not a number
            raise bad from None
    return tuple(rules)


def check_url(url: object, rules: Sequence[AllowRule]) -> str:
    """The URL if it may receive webhooks; else 422 `webhook_not_allowed` (or
    `invalid_request` when it is not a URL at all)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise ApiError(
            422,
            "invalid_request",
            f"`notify_url` must be a URL of at most {MAX_URL_LENGTH} characters",
            "send an http(s) URL, or leave notify_url out",
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ApiError(
            422, "invalid_request", "`notify_url` is not a valid URL", "check its host and port"
        ) from None
    refuse = "ask the server's operator to allow it (--webhook-allow)"
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ApiError(
            422,
            "webhook_not_allowed",
            "`notify_url` must be an http or https URL with a host",
            refuse if rules else "this server sends no webhooks (--webhook-allow is empty)",
        )
    if parts.username is not None or parts.password is not None:
        raise ApiError(
            422,
            "webhook_not_allowed",
            "`notify_url` must not hold a user name or password",
            "authenticate the request with its signature (see docs/server.md, Webhooks)",
        )
    host = parts.hostname.lower()
    port = port or _DEFAULT_PORTS[parts.scheme]
    if not any(r.matches(parts.scheme, host, port, parts.path or "/") for r in rules):
        raise ApiError(
            422,
            "webhook_not_allowed",
            f"this server does not send webhooks to {host}:{port}",
            refuse if rules else "this server sends no webhooks (--webhook-allow is empty)",
        )
    return url


# -- signing --------------------------------------------------------------------------------
def sign(key: bytes, body: bytes, timestamp: int) -> str:
    """The `X-CryoMamba-Signature` value: `t=<unix>,v1=<hex HMAC-SHA256 of "t." + body>`."""
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(key: bytes, body: bytes, header: str, *, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: the signature matches and its timestamp is recent."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(key, body, timestamp).rpartition("v1=")[2]
    fresh = abs(time.time() - timestamp) <= tolerance_s
    return hmac.compare_digest(expected, fields.get("v1", "")) and fresh


def load_webhook_secret(settings: ServerSettings) -> bytes:
    """The key that signs webhooks: $CRYOMAMBA_WEBHOOK_SECRET, or a 0600 file made on first
    boot (`--webhook-secret-file`, default DATA_DIR/webhook.key). Separate from the token
    secret, because every receiver must hold it."""
    env = os.environ.get("CRYOMAMBA_WEBHOOK_SECRET")
    if env:
        return _long_enough(env, "$CRYOMAMBA_WEBHOOK_SECRET")
    path = settings.webhook_secret_path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    return _long_enough(path.read_text().strip(), f"the webhook secret in {path}")


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """A job record as a webhook body: artifact URLs and their expiry left out (a signed URL
    is a credential; the receiver fetches fresh ones with GET /v1/jobs/{id}), and the
    delivery's own status too."""
    artifacts = {
        name: {k: v for k, v in info.items() if k not in ("url", "expires_at")}
        for name, info in (record.get("artifacts") or {}).items()
    }
    out = {k: v for k, v in record.items() if k != "webhook"}
    out["artifacts"] = artifacts
    return out


# -- the sender -----------------------------------------------------------------------------
class WebhookSender:
    """Delivers due outbox rows, one at a time, on its own thread.

    `render(job_id)` returns the job's body (None if the job is gone). Backoff after the
    n-th failed attempt: `min(backoff_max_s, backoff_s * 2**(n-1))`, times a random factor
    in [0.5, 1] so receivers coming back up are not hit by every server at once.
    """

    def __init__(
        self,
        storage: Storage,
        settings: ServerSettings,
        key: bytes,
        render: Callable[[str], dict[str, Any] | None],
    ) -> None:
        self.storage, self.settings, self.key, self.render = storage, settings, key, render
        self.rules = parse_allow(settings.webhook_allow)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cryomamba-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:  # a bug must not end deliveries for good
                log.exception("webhook delivery loop failed")
            self._stop.wait(POLL_S)

    def run_due(self, now: float | None = None) -> int:
        """Attempt every delivery due at `now` (default: now); how many were attempted."""
        rows = self.storage.due_webhooks(time.time() if now is None else now)
        for row in rows:
            if self._stop.is_set():
                break
            self.attempt(row)
        return len(rows)

    def backoff(self, attempts: int) -> float:
        s = self.settings
        base = min(s.webhook_backoff_max_s, s.webhook_backoff_s * 2 ** max(0, attempts - 1))
        return base * random.uniform(0.5, 1.0)

    def attempt(self, row: dict[str, Any]) -> None:
        """One try at one delivery; the outcome is written to its row."""
        s, now = self.settings, time.time()
        if now - row["created_at"] > s.webhook_max_age_s:
            self._give_up(row, row["attempts"], f"older than {s.webhook_max_age_s:g} s")
            return
        try:
            check_url(row["url"], self.rules)
        except ApiError as exc:
            self._give_up(row, row["attempts"], f"destination refused: {exc.message}")
            return
        record = self.render(row["job_id"])
        if record is None:
            self._give_up(row, row["attempts"], "the job no longer exists")
            return
        body = json.dumps(public_record(record), separators=(",", ":")).encode()
        attempts = row["attempts"] + 1
        error = self._post(row, body)
        if error is None:
            self.storage.update_webhook(
                row["id"], state="delivered", attempts=attempts, delivered_at=time.time()
            )
            log.info(
                "webhook %s for job %s delivered (attempt %d)", row["id"], row["job_id"], attempts
            )
        elif attempts >= s.webhook_attempts:
            self._give_up(row, attempts, error)
        else:
            delay = self.backoff(attempts)
            self.storage.update_webhook(
                row["id"], attempts=attempts, last_error=error, next_at=time.time() + delay
            )
            log.info(
                "webhook %s for job %s: attempt %d failed (%s); next in %.1f s",
                row["id"],
                row["job_id"],
                attempts,
                error,
                delay,
            )

    def _give_up(self, row: dict[str, Any], attempts: int, error: str) -> None:
        self.storage.update_webhook(row["id"], state="failed", attempts=attempts, last_error=error)
        log.warning(
            "webhook %s for job %s: gave up after %d attempt(s): %s",
            row["id"],
            row["job_id"],
            attempts,
            error,
        )

    def _post(self, row: dict[str, Any], body: bytes) -> str | None:
        """POST once, never following a redirect; None on a 2xx, else what went wrong."""
        parts = urlsplit(row["url"])
        host = parts.hostname or ""
        timeout = self.settings.webhook_timeout_s
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            ctx = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "cryomamba-webhooks",
            EVENT_HEADER: f"job.{row['event']}",
            DELIVERY_HEADER: row["id"],
            SIGNATURE_HEADER: sign(self.key, body, int(time.time())),
        }
        try:
            conn.request("POST", target, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(64 << 10)
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        finally:
            conn.close()
        if 200 <= resp.status < 300:
            return None
        return f"HTTP {resp.status}"
