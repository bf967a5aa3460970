"""JSON log lines for the server: one object per line, request fields merged in."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

__all__ = ["JsonFormatter", "configure_logging"]


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...fields}`; exceptions as one string."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", audit_log: Path | None = None) -> None:
    """Send every logger (ours and uvicorn's) through one JSON handler on stderr.

    Whatever an entry point set up before (the `cryomamba` command's rich handler and its
    WARNING level on the `cryomamba` logger) is taken down, so each record is written once,
    as one JSON line, at the server's level."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("cryomamba", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn(...) as JSON lines too, not raw stderr text
    audit = logging.getLogger("cryomamba.audit")
    audit.setLevel(logging.INFO)  # written whatever the server's level: it is a record, not noise
    for old in audit.handlers[:]:
        audit.removeHandler(old)
        old.close()
    if audit_log is not None:  # its own file as well (the main log keeps every line too)
        audit_log.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(audit_log, encoding="utf-8")
        file_handler.setFormatter(JsonFormatter())
        audit.addHandler(file_handler)
