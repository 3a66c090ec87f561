"""Log set-up: nydusd's level names, log file naming and rotation, and JSON lines.

The JSON formatter is hand-written: it is a dozen lines, and a library for it
would be one more dependency to pin for no behaviour we need.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: nydusd's level names (Rust `log::LevelFilter`, case-insensitive) to Python levels.
LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}

TEXT_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        del datefmt
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def parse_level(name: str) -> int:
    """Return the Python level for a nydusd level name.

    Raises:
        ValueError: the name is not one of nydusd's levels.
    """
    try:
        return LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"invalid log level {name!r}, expected one of {', '.join(LEVELS)}") from None


def log_file_path(path: str) -> str:
    """Add `.log` to a log file name without extension, as nydusd does."""
    base = os.path.basename(path)
    return path if os.path.splitext(base)[1] else path + ".log"


def setup_logging(level: int, *, log_file: str | None, rotation_mb: int, json_lines: bool) -> None:
    """Configure the root logger once for the daemon process."""
    if log_file:
        if rotation_mb > 0:
            handler: logging.Handler = logging.handlers.RotatingFileHandler(
                log_file, maxBytes=rotation_mb * 1024 * 1024, backupCount=5
            )
        else:
            handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def set_level(level: int) -> None:
    """Change the daemon's log level at run time."""
    logging.getLogger().setLevel(level)
