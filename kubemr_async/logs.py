"""Structured logs: one JSON object per line on stderr, with the record's context fields.

Context (job, task, attempt, worker, error) travels in ``extra=``; only those known keys
are emitted, so nothing else a caller attaches (credentials included) leaks into logs. The
text that is emitted (messages, errors, tracebacks: a library's debug lines print request
headers and error bodies) is scrubbed of this process's own keys and of anything shaped
like a credential (:mod:`kubemr_async.scrub`).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

from .scrub import own_secrets, scrub

CONTEXT_FIELDS = ("job", "task", "attempt", "worker", "phase", "error", "permanent", "count",
                  "pid", "exit_code", "port")


def _clean(text: str) -> str:
    return scrub(text, own_secrets(os.environ))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _clean(record.getMessage()),
        }
        for name in CONTEXT_FIELDS:
            if name in record.__dict__:
                value = record.__dict__[name]
                entry[name] = _clean(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = _clean(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def is_framework(logger: str) -> bool:
    """kubemr's own loggers, as opposed to ``kubemr.user`` (ctx.log) and the user's."""
    return (logger == "kubemr" or logger.startswith("kubemr.")) and not (
        logger == "kubemr.user" or logger.startswith("kubemr.user."))


class _UserFormatter(logging.Formatter):
    """ctx.log and the user's own loggers on a terminal: the message, and its level if
    it is not plain info."""

    def format(self, record: logging.LogRecord) -> str:
        if is_framework(record.name):
            return JSONFormatter().format(record)
        text = record.getMessage()
        if record.levelno != logging.INFO:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_console(verbose: bool) -> None:
    """Logging for a job run in this process (``--inline``): user logs as plain lines on
    stderr, framework logs only when ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UserFormatter())
    if not verbose:
        handler.addFilter(lambda record: not is_framework(record.name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
