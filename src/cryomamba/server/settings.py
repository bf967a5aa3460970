"""`ServerSettings`: every knob of the server, from command-line flags or `CRYOMAMBA_SERVER_*`."""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["MiB", "ServerSettings", "load_secret"]

MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    """What the server needs to know; defaults suit one GPU box serving a small lab."""

    data_dir: Path = Path("cryomamba-data")
    host: str = "127.0.0.1"
    port: int = 8000
    roots: tuple[Path, ...] = ()  # folders whose files jobs may name by server path
    models_dir: Path | None = None
    models: tuple[str, ...] = ()  # allowed model names; empty = every registered model
    devices: tuple[str, ...] = ()  # e.g. ("cuda:0", "cuda:1"); empty = one, auto-detected
    jobs_per_device: int = 1
    executor: str = "local"  # the back end that runs jobs, by its name in the executor registry
    cluster: str | None = None  # executor "dask": scheduler address or "slurm"; None: LocalCluster
    part_size: int = 16 * MiB
    part_size_min: int = 8 * MiB
    part_size_max: int = 32 * MiB
    max_upload_bytes: int = 64 << 30
    upload_ttl_s: float = 24 * 3600.0
    upload_concurrency: int = 8  # part PUTs in flight per user (token subject)
    rate_limit_per_min: int = 60
    auth_failures_per_min: int = 20  # failed authentications per client address (429 beyond)
    max_tiles: int = 250_000  # per job; a 10 GB float32 tomogram, 64³ patch, step 0.5: ~75k
    max_header_bytes: int = 64 << 10  # request line + headers (431 beyond)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (else closed)
    idle_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # connections and requests at once (503 beyond)
    url_ttl_s: float = 3600.0
    keepalive_s: float = 25.0
    on_restart: str = "fail"  # what happens to jobs that were running: "fail" or "requeue"
    secret_file: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    log_level: str = "info"
    webhook_allow: tuple[str, ...] = ()  # URL prefixes / host[:port] jobs may notify; none
    webhook_secret_file: Path | None = None  # the webhook signing key (DATA_DIR/webhook.key)
    webhook_attempts: int = 12  # tries per delivery before it is given up
    webhook_max_age_s: float = 24 * 3600.0  # a delivery not done after this is given up
    webhook_backoff_s: float = 2.0  # the wait after the first failed try; doubles each time
    webhook_backoff_max_s: float = 600.0  # the longest wait between tries
    webhook_timeout_s: float = 10.0  # connect + answer, per try
    trusted_proxies: tuple[str, ...] = ()  # addresses/CIDRs whose X-Forwarded-* are believed
    audit_log: Path | None = None  # also write the audit log's JSON lines to this file

    def __post_init__(self) -> None:
        if self.on_restart not in ("fail", "requeue"):
            raise ConfigError(
                f"on_restart must be 'fail' or 'requeue', got {self.on_restart!r}",
                hint="--on-restart fail marks interrupted jobs failed; requeue runs them again",
            )
        if not self.part_size_min <= self.part_size <= self.part_size_max:
            raise ConfigError(
                f"part size {self.part_size} is outside {self.part_size_min}..{self.part_size_max}",
                hint="choose a part size between 8 and 32 MiB",
            )
        if self.cluster is not None and self.executor != "dask":
            raise ConfigError(
                f"--cluster is for --executor dask (the executor is {self.executor!r})",
                hint="add --executor dask, or drop --cluster",
            )
        for name in (
            "jobs_per_device",
            "upload_concurrency",
            "rate_limit_per_min",
            "auth_failures_per_min",
            "max_tiles",
            "max_header_bytes",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.webhook_attempts < 1:
            raise ConfigError(f"webhook_attempts must be at least 1, got {self.webhook_attempts}")
        for name in (
            "webhook_max_age_s",
            "webhook_backoff_s",
            "webhook_backoff_max_s",
            "webhook_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        from .webhooks import parse_allow

        parse_allow(self.webhook_allow)  # a typo must fail at start, not refuse every job
        for name in ("header_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        _check_proxies(self.trusted_proxies)
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError(
                "TLS needs both a certificate and a key",
                hint="pass --ssl-certfile and --ssl-keyfile together",
            )

    def replace(self, **changes) -> ServerSettings:
        return dataclasses.replace(self, **changes)

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "cryomamba.sqlite3"

    @property
    def secret_path(self) -> Path:
        return self.secret_file or self.data_dir / "secret.key"

    @property
    def webhook_secret_path(self) -> Path:
        return self.webhook_secret_file or self.data_dir / "webhook.key"

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None


def _check_proxies(proxies: tuple[str, ...]) -> None:
    """Each trusted proxy must be an IP address or network: a typo must not trust everyone."""
    import ipaddress

    for item in proxies:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f"trusted proxy {item!r} is not an IP address or network",
                hint="e.g. --trusted-proxies 127.0.0.1,::1 or 10.0.0.0/24",
            ) from None


def load_secret(settings: ServerSettings, *, create: bool = True) -> bytes:
    """The key that signs tokens and URLs: $CRYOMAMBA_SECRET, or a 0600 file made on first boot."""
    env = os.environ.get("CRYOMAMBA_SECRET")
    if env:
        return _long_enough(env, "$CRYOMAMBA_SECRET")
    path = settings.secret_path
    if not path.exists():
        if not create:
            raise ConfigError(
                f"no secret at {path}",
                hint="start the server once with this --data-dir, or set CRYOMAMBA_SECRET",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return _long_enough(path.read_text().strip(), f"the secret in {path}")


def _long_enough(secret: str, where: str) -> bytes:
    """A short secret makes tokens guessable: at least 32 characters, wherever it comes from."""
    if len(secret) < 32:
        raise ConfigError(
            f"{where} is too short ({len(secret)} characters)",
            hint="use at least 32 random characters, e.g. `python -c 'import secrets; "
            "print(secrets.token_hex(32))'`",
        )
    return secret.encode()
