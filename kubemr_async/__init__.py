"""kubemr-async: Kubernetes-native, masterless MapReduce for Python.

The public API is small: a :class:`Job` with ``async def`` callbacks (or the low-level
:class:`JobWorker`), the :class:`TaskContext` every callback receives, and
:func:`partition_for` for low-level jobs that partition by themselves, and
:func:`read_results` to read a finished job's results back in any output format;
:class:`Shell` makes a shell command a map, combine or reduce step (Hadoop Streaming);
:class:`Pipeline` runs several Jobs as the steps of one multi-step job.

The names are imported on first use (PEP 562): importing the package, as ``kubemr --help``
and every ``kubemr`` command do, must not pay for numpy and pyarrow (~0.5 s) until a
command needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see: the same names, imported eagerly
    from .api import Job as Job
    from .api import JobWorker as JobWorker
    from .api import Pipeline as Pipeline
    from .api import Shell as Shell
    from .api import TaskContext as TaskContext
    from .errors import CounterError as CounterError
    from .errors import JobFailed as JobFailed
    from .errors import KubemrError as KubemrError
    from .errors import PermanentTaskError as PermanentTaskError
    from .errors import UsageError as UsageError
    from .results import read_results as read_results
    from .shuffle import partition_for as partition_for

#: Each public name and the module that defines it.
_HOMES = {
    "CounterError": "errors",
    "Job": "api",
    "JobFailed": "errors",
    "JobWorker": "api",
    "KubemrError": "errors",
    "PermanentTaskError": "errors",
    "Pipeline": "api",
    "Shell": "api",
    "TaskContext": "api",
    "UsageError": "errors",
    "partition_for": "shuffle",
    "read_results": "results",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
