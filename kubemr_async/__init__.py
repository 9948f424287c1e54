"""kubemr-async: Kubernetes-native, masterless MapReduce for Python.

The public API is small: a :class:`Job` with ``async def`` callbacks (or the low-level
:class:`JobWorker`), the :class:`TaskContext` every callback receives, and
:func:`partition_for` for low-level jobs that partition by themselves, and
:func:`read_results` to read a finished job's results back in any output format;
:class:`Shell` makes a shell command a map, combine or reduce step (Hadoop Streaming);
:class:`Pipeline` runs several Jobs as the steps of one multi-step job.
"""

from .api import Job, JobWorker, Pipeline, Shell, TaskContext
from .errors import CounterError, JobFailed, KubemrError, PermanentTaskError, UsageError
from .results import read_results
from .shuffle import partition_for

__all__ = [
    "CounterError",
    "Job",
    "JobFailed",
    "JobWorker",
    "KubemrError",
    "PermanentTaskError",
    "Pipeline",
    "Shell",
    "TaskContext",
    "UsageError",
    "partition_for",
    "read_results",
]
