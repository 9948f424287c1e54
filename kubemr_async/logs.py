"""Structured logs: one JSON object per line on stderr, with the record's context fields.

Context (job, task, attempt, worker, error) travels in ``extra=``; only those known keys
are emitted, so nothing else a caller attaches (credentials included) leaks into logs.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

CONTEXT_FIELDS = ("job", "task", "attempt", "worker", "phase", "error", "permanent", "count",
                  "pid", "exit_code")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
