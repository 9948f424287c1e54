"""The two CustomResourceDefinitions, generated from one place so schema and code agree.

``MapReduceJob`` is what users submit (``kubectl create -f job.yaml``): a small spec plus a
status that carries the job-wide state (phase, verdict, results). ``MapReduceTask`` holds one
task's protocol record under ``.status``; there is one object per task, so a claim, a lease
renewal or a commit rewrites one small object whose size never depends on how many tasks
the job has (the original kubemr rewrote one ever-growing object and had to give up).

Limits and defaults come from :mod:`kubemr_async.spec`, so ``kubemr run``, the operator and
the API server reject the same things. The manifests under ``charts/kubemr-async/crds/``
are written from here (``python -m kubemr_async.crd --write``) and a test fails when they
drift. :func:`ensure_crds` installs them into a cluster (operator start-up, tests).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import yaml

from .conditions import CONDITION_TYPES
from .counters import MAX_COUNTERS
from .errors import KubemrError
from .kube import APPLY_PATCH, CRDS, Kube, KubeObject, Resource
from .protocol import MAX_HISTORY, AttemptOutcome, JobPhase, TaskKind, TaskState
from .skips import MAX_ERROR_CHARS, MAX_JOB_SAMPLE, MAX_KEY_CHARS, MAX_TASK_SAMPLE
from .spec import (
    COMMAND_FIELDS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_REDUCERS,
    DEFAULT_WORKERS,
    IDENTITY_ANNOTATIONS,
    MAX_ATTEMPTS_LIMIT,
    MAX_JOB_NAME,
    MAX_REDUCERS,
    MAX_SKIPPED_RECORDS_LIMIT,
    MAX_SPLITS_PER_TASK,
    MAX_STEPS,
    MAX_WORKERS,
    MIN_CHUNK_SIZE,
    MIN_LEASE_SECONDS,
    MIN_MEMORY,
    NAME_PATTERN,
    OUTPUT_FORMATS,
    OUTPUT_PATTERN,
    RESOURCE_REQUIRED,
    SECRET_NAME_PATTERN,
    TEMPLATE_IDENTITY_FIELDS,
    TEMPLATE_WORKER_FIELDS,
)

GROUP = "kubemr.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

JOB_KIND = "MapReduceJob"
JOB_PLURAL = "mapreducejobs"
TASK_KIND = "MapReduceTask"
TASK_PLURAL = "mapreducetasks"

#: Where the two resource types live in the API (for :class:`~kubemr_async.kube.Kube`).
MAPREDUCE_JOBS = Resource(GROUP, VERSION, JOB_PLURAL, JOB_KIND)
MAPREDUCE_TASKS = Resource(GROUP, VERSION, TASK_PLURAL, TASK_KIND)

#: Labels on every task object (and on a job's task namespace): RBAC cannot filter by
#: label, but watches and clean-up can.
LABEL_JOB = f"{GROUP}/job"
LABEL_KIND = f"{GROUP}/kind"
#: The protocol's record key of a task object (``map-00042``), so names stay free-form.
LABEL_TASK = f"{GROUP}/task"
#: A task's shard (``protocol.shard_of``): a worker watches only its own shard's tasks.
LABEL_SHARD = f"{GROUP}/shard"
#: A task's state, kept equal to ``.status.state`` by every write that changes it, so a
#: worker can list just the unfinished tasks (``state!=committed``).
LABEL_STATE = f"{GROUP}/state"
#: On a task namespace: the namespace of the MapReduceJob that owns it.
LABEL_JOB_NAMESPACE = f"{GROUP}/job-namespace"

#: The reason of the Event saying a job adopted a warm pool's standby; its ``related``
#: object is the standby's pod (the operator writes it, ``kubemr logs`` reads it).
ADOPTED_REASON = "Adopted"

#: Field manager for server-side apply, so ``kubectl`` shows who owns the fields.
FIELD_MANAGER = "kubemr-async"

CRD_DIR = Path(__file__).resolve().parent.parent / "charts" / "kubemr-async" / "crds"


def _int(minimum: int | None = None, maximum: int | None = None, *,
         default: int | None = None, fmt: str | None = None, doc: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    if fmt:
        schema["format"] = fmt
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if default is not None:
        schema["default"] = default
    if doc:
        schema["description"] = doc
    return schema


def _string(doc: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": doc} if doc else {}), **extra}


def _job_spec_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "What to run, on what, with which limits. What the job computes "
                       "(job, inputs, reducers, output, chunking) is fixed once created.",
        "required": list(RESOURCE_REQUIRED),
        "properties": {
            "image": _string("Worker container image (built from the kubemr-async base).",
                             minLength=1),
            "workers": _int(1, MAX_WORKERS, default=DEFAULT_WORKERS,
                            doc="Worker pods to run in parallel."),
            "reducers": _int(0, MAX_REDUCERS, default=DEFAULT_REDUCERS,
                             doc="Reduce partitions, i.e. output parts; 0 runs a map-only "
                                 "job whose maps' outputs are the result parts."),
            "inputs": {
                "type": "array",
                "description": "Input URLs (s3://bucket/key or prefixes); split into maps.",
                "minItems": 1,
                "items": _string(minLength=1),
                "x-kubernetes-list-type": "atomic",
            },
            "job": _string("The job module: a file in the image (/app/wordcount.py) or "
                           "'package.module:attribute'. Optional with a mapper command.",
                           minLength=1),
            "mapper": _string("A shell command as the map (Hadoop Streaming): the split's "
                              "lines on stdin, key<TAB>value lines on stdout. Replaces the "
                              "job module's map, or is the job with no module.", minLength=1),
            "combiner": _string("A shell command as the map-side combiner, run on every "
                                "spill buffer: sorted key<TAB>value lines in and out.",
                                minLength=1),
            "reducer": _string("A shell command as the reducer: the partition's key<TAB>value "
                               "lines sorted by key on stdin; its stdout is the result part.",
                               minLength=1),
            "steps": _int(1, MAX_STEPS, doc="A multi-step job (a Pipeline module): its "
                          "number of steps, run one after another in this one job, each "
                          "reading the previous step's (key, value) pairs. Unset: 1."),
            "stepReducers": {
                "type": "array",
                "description": "A multi-step job: each step's reducer count, in order (the "
                               "operator plans every step without the module); the first "
                               "equals reducers. kubemr submit fills it from the module.",
                "maxItems": MAX_STEPS,
                "items": _int(0, MAX_REDUCERS),
                "x-kubernetes-list-type": "atomic",
            },
            "args": {
                "type": "object",
                "description": "Free-form string arguments handed to the job's callbacks.",
                "additionalProperties": {"type": "string"},
            },
            "maxAttempts": _int(1, MAX_ATTEMPTS_LIMIT, default=DEFAULT_MAX_ATTEMPTS,
                                doc="Failed attempts (incl. lost leases) that fail a task."),
            "leaseSeconds": {
                "type": "number",
                "description": "A claim's lease; a worker that stops renewing loses the task.",
                "minimum": MIN_LEASE_SECONDS,
                "default": DEFAULT_LEASE_SECONDS,
            },
            "chunkSize": _int(MIN_CHUNK_SIZE, default=DEFAULT_CHUNK_SIZE, fmt="int64",
                              doc="Bytes of input per map task."),
            "maxSkippedRecords": _int(
                0, MAX_SKIPPED_RECORDS_LIMIT,
                doc="Skip mode: each task skips up to this many records (per-record map "
                    "inputs) or reduce keys whose call raises or that do not parse, instead "
                    "of failing; counted as kubemr/skippedRecords. Unset or 0: off."),
            "splitsPerTask": _int(
                1, MAX_SPLITS_PER_TASK,
                doc="Batching tiny tasks: each map task holds up to this many consecutive "
                    "input splits and maps them one after another in one attempt, so the "
                    "coordination writes are paid once per batch. A retry re-maps the "
                    "whole batch. Unset or 1: one split per map."),
            "taskTimeoutSeconds": {
                "type": "number",
                "description": "Seconds a task attempt's work (reading its inputs, the "
                               "callbacks or shell commands, writing its output) may take; "
                               "a longer attempt is cancelled and fails as timed out, "
                               "retried up to maxAttempts. Unset: no limit.",
                "minimum": 0,
                "exclusiveMinimum": True,
            },
            "speculative": {
                "type": "boolean",
                "description": "Backup tasks: an idle worker may run a second attempt of a "
                               "task far slower than its stage's committed ones; the first "
                               "to commit wins. false: off.",
                "default": True,
            },
            "memory": _int(MIN_MEMORY, fmt="int64",
                           doc="Bytes of memory each worker's shuffle stays within (buffers, "
                               "merges, fetches); beyond it data spills to local scratch. "
                               "Unset: the worker container's memory limit minus headroom "
                               "for the interpreter."),
            "output": _string("Where results go: s3://bucket/prefix.", pattern=OUTPUT_PATTERN),
            "splitInputs": {
                "type": "boolean",
                "description": "Cut inputs into line-aligned chunks of chunkSize (key/value "
                               "jobs); false gives one map per input file (prefixes and "
                               "globs expanded) or per other input string, verbatim.",
                "default": True,
            },
            "outputFormat": {
                "type": "string",
                "description": "How result parts are written: text (key<TAB>value lines), "
                               "jsonl ([key, value] per line) or parquet.",
                "enum": list(OUTPUT_FORMATS),
                "default": DEFAULT_OUTPUT_FORMAT,
            },
            "ttlSecondsAfterFinished": _int(
                0, doc="Delete the job this many seconds after it finished; unset keeps it."),
            "template": _template_schema(),
            "storage": _storage_schema(),
        },
        # Changing what a running job computes would mix two jobs' tasks and outputs.
        "x-kubernetes-validations": [
            {"rule": "has(self.job) || has(self.mapper)",
             "message": "spec.job: a job module (or spec.mapper, a shell command) is required",
             "fieldPath": ".job"},
            {"rule": "!has(self.stepReducers) || "
                     "size(self.stepReducers) == (has(self.steps) ? self.steps : 1)",
             "message": "spec.stepReducers: must give one count per step",
             "fieldPath": ".stepReducers"},
            {"rule": "!has(self.stepReducers) || self.stepReducers[0] == self.reducers",
             "message": "spec.reducers: must equal spec.stepReducers[0]",
             "fieldPath": ".reducers"},
            {"rule": "!has(self.splitsPerTask) || self.splitsPerTask == 1 || "
                     "!has(self.splitInputs) || self.splitInputs",
             "message": "spec.splitsPerTask: must be 1 when spec.splitInputs is false",
             "fieldPath": ".splitsPerTask"},
            *({"rule": f"self.{field} == oldSelf.{field}",
               "message": f"spec.{field} is immutable", "fieldPath": f".{field}"}
              for field in ("inputs", "reducers", "output", "chunkSize", "splitInputs",
                            "outputFormat")),
            # Optional fields: set or unset as before, and the same value.
            *({"rule": f"has(self.{field}) == has(oldSelf.{field}) && "
                       f"(!has(self.{field}) || self.{field} == oldSelf.{field})",
               "message": f"spec.{field} is immutable", "fieldPath": f".{field}"}
              for field in ("job", *COMMAND_FIELDS, "steps", "stepReducers",
                            "splitsPerTask")),
        ],
    }


#: Containers (and init containers) a template may list: bounds the CEL rules' cost.
MAX_TEMPLATE_CONTAINERS = 16


def _template_schema() -> dict[str, Any]:
    """``spec.template``: free-form pod overrides, except what admission can refuse for
    every namespace (the identity and the worker container's image and command); the
    Pod Security check of the merged pod is the operator's (it depends on the namespace)."""
    container = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                       "command": {"type": "array", "items": {"type": "string"}},
                       "args": {"type": "array", "items": {"type": "string"}}},
    }
    worker_rule = " && ".join(f"!has(c.{f})" for f in TEMPLATE_WORKER_FIELDS)
    pod_spec = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "serviceAccountName": {"type": "string"},
            "serviceAccount": {"type": "string"},
            "automountServiceAccountToken": {"type": "boolean"},
            "containers": {"type": "array", "maxItems": MAX_TEMPLATE_CONTAINERS,
                           "items": container},
        },
        "x-kubernetes-validations": [
            *({"rule": f"!has(self.{field})",
               "message": f"spec.template.spec.{field} cannot be set: workers run as the "
                          "job's own ServiceAccount, made by the operator",
               "fieldPath": f".{field}"} for field in TEMPLATE_IDENTITY_FIELDS),
            {"rule": "!has(self.containers) || self.containers.all(c, "
                     f"(has(c.name) && c.name != 'worker') || ({worker_rule}))",
             "message": "spec.template.spec.containers[worker]: image, command and args "
                        "cannot be set (the image is spec.image; the command is kubemr's)",
             "fieldPath": ".containers"},
        ],
    }
    return {
        "type": "object",
        "description": "Pod template overrides for the worker pods, merged by the operator "
                       "and checked against the namespace's Pod Security level (restricted "
                       "unless the platform allows more).",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {"spec": pod_spec},
    }


def _storage_schema() -> dict[str, Any]:
    """``spec.storage``: the tenant's own credentials for the workers."""
    allowed = ", ".join(f"'{a}'" for a in IDENTITY_ANNOTATIONS)
    return {
        "type": "object",
        "description": "The workers' storage credentials, the job's own: a Secret in the "
                       "job's namespace (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                       "optional AWS_SESSION_TOKEN), or workload identity through "
                       "annotations on the job's ServiceAccount. Unset: the platform's "
                       "credentials, where the platform allows the namespace.",
        "properties": {
            "credentialsSecret": _string("A Secret in the job's namespace.",
                                         maxLength=253, pattern=SECRET_NAME_PATTERN),
            "serviceAccountAnnotations": {
                "type": "object",
                "description": f"Workload identity: any of {', '.join(IDENTITY_ANNOTATIONS)}.",
                "minProperties": 1,
                "maxProperties": len(IDENTITY_ANNOTATIONS),
                "additionalProperties": {"type": "string", "maxLength": 1024},
                "x-kubernetes-validations": [{
                    "rule": f"self.all(k, k in [{allowed}])",
                    "message": "spec.storage.serviceAccountAnnotations: only "
                               f"{', '.join(IDENTITY_ANNOTATIONS)} are allowed",
                }],
            },
        },
        "x-kubernetes-validations": [{
            "rule": "!(has(self.credentialsSecret) && has(self.serviceAccountAnnotations))",
            "message": "spec.storage: give credentialsSecret or serviceAccountAnnotations, "
                       "not both",
        }],
    }


def _counters_schema(doc: str, per_task: bool) -> dict[str, Any]:
    """``{group: {name: amount}}``. Atomic, so managedFields name the field, not every
    counter (that would double a task record's cost of its counters); a task's are capped
    as ``ctx.counter`` caps them (its groups, plus the framework's)."""
    limit: dict[str, Any] = {"maxProperties": MAX_COUNTERS + 1} if per_task else {}
    names: dict[str, Any] = {"maxProperties": MAX_COUNTERS} if per_task else {}
    return {
        "type": "object",
        "description": doc,
        **limit,
        "additionalProperties": {
            "type": "object",
            **names,
            "additionalProperties": {"type": "integer", "format": "int64"},
        },
        "x-kubernetes-map-type": "atomic",
    }


def _skipped_schema(doc: str, per_task: bool) -> dict[str, Any]:
    """A sample of skipped records. Atomic, like counters; bounded as skips.py bounds it."""
    place: dict[str, Any] = {
        "error": {"type": "string", "maxLength": MAX_ERROR_CHARS},
        "offset": _int(0, fmt="int64"),
        "line": _int(1, fmt="int64"),
        "key": {"type": "string", "maxLength": MAX_KEY_CHARS},
    }
    if not per_task:
        place |= {"task": {"type": "string"}, "input": {"type": "string"}}
    return {
        "type": "array",
        "description": doc,
        "maxItems": MAX_TASK_SAMPLE if per_task else MAX_JOB_SAMPLE,
        "items": {"type": "object", "required": ["error"], "properties": place},
        "x-kubernetes-list-type": "atomic",
    }


def _job_status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Job-wide state written by workers and the operator; tasks live in "
                       "MapReduceTask objects in status.taskNamespace.",
        "properties": {
            "phase": {
                **_string("Pending until every task exists, then Running, then decided."),
                "enum": [p.value for p in JobPhase],
                # Failed and Cancelled jobs may be retried (back to Running); a Succeeded
                # job's results are final.
                "x-kubernetes-validations": [{
                    "rule": f"oldSelf != '{JobPhase.SUCCEEDED.value}' || self == oldSelf",
                    "message": "a Succeeded job's phase cannot change",
                }, {
                    "rule": f"!(oldSelf in ['{JobPhase.FAILED.value}', "
                            f"'{JobPhase.CANCELLED.value}']) || self == oldSelf "
                            f"|| self == '{JobPhase.RUNNING.value}'",
                    "message": "a Failed or Cancelled job can only go back to Running (retry)",
                }],
            },
            "maps": _int(0, doc="Map tasks the job (a multi-step job's current step) was "
                                "split into."),
            "step": _int(0, MAX_STEPS - 1, doc="A multi-step job's current step (0-based): "
                                               "only its tasks run."),
            "mapsDone": _int(0),
            "reduces": _int(0),
            "reducesDone": _int(0),
            "results": {
                "type": "array",
                "description": "Committed outputs of the reducers, in partition order.",
                "items": {"type": "string"},
                "x-kubernetes-list-type": "atomic",
            },
            "error": {
                "type": "object",
                "nullable": True,
                "description": "Why the job failed: the task, its attempt and the message.",
                "properties": {
                    "task": {"type": "string"},
                    "attempt": _int(0),
                    "message": {"type": "string"},
                },
            },
            "seq": _int(0, doc="Bumped by every write; guarded writes test it (CAS)."),
            "shards": _int(1, doc="How many shards the tasks are dealt into (label "
                                  f"{GROUP}/shard); each worker watches one."),

            "counters": _counters_schema(
                "The job's counters, {group: {name: amount}}: the sum over its committed "
                "tasks, each counted once (group kubemr: the framework's).", per_task=False),
            "skipped": _skipped_schema(
                "Skip mode: a sample of the records the committed tasks skipped (input, "
                "offset or line, or reduce key, and the error); their number is counter "
                "kubemr/skippedRecords.", per_task=False),
            "observedGeneration": _int(fmt="int64"),
            "conditions": _conditions_schema(),
            "taskNamespace": _string("Namespace holding this job's MapReduceTask objects."),
            "startTime": _string(format="date-time"),
            "completionTime": _string(format="date-time"),
        },
    }


def _conditions_schema() -> dict[str, Any]:
    """``status.conditions`` as Kubernetes API conventions define them (metav1.Condition),
    one per type (a map keyed by type), so ``kubectl wait --for=condition=...`` works."""
    return {
        "type": "array",
        "description": "The job's state in the generic shape: one condition per type in "
                       f"{', '.join(CONDITION_TYPES)}, True for the current phase.",
        "items": {
            "type": "object",
            "required": ["type", "status", "reason", "lastTransitionTime"],
            "properties": {
                "type": _string(enum=list(CONDITION_TYPES)),
                "status": _string(enum=["True", "False", "Unknown"]),
                "reason": _string(maxLength=1024),
                "message": _string(maxLength=32768),
                "lastTransitionTime": _string(format="date-time"),
                "observedGeneration": _int(0, fmt="int64"),
            },
        },
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    }


def _column(name: str, path: str, kind: str = "integer", priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        column["priority"] = priority
    return column


_AGE = _column("Age", ".metadata.creationTimestamp", "date")


def _crd(kind: str, plural: str, short: str, schema: dict[str, Any],
         columns: list[dict[str, Any]], status_subresource: bool) -> dict[str, Any]:
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": schema},
        "additionalPrinterColumns": columns,
    }
    if status_subresource:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["kubemr"],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


def job_crd() -> dict[str, Any]:
    """The MapReduceJob CRD: validated spec, status subresource for the job-wide state."""
    schema = {
        "type": "object",
        "description": "A MapReduce job: workers claim its tasks without a master.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _job_spec_schema(),
            "status": _job_status_schema(),
        },
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {MAX_JOB_NAME}",
            "message": f"metadata.name must be at most {MAX_JOB_NAME} characters: it is "
                       "used in task names and label values",
        }, {
            "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
            "message": "metadata.name must be a DNS label (lowercase letters, digits and "
                       "'-'): it is used in task names and label values",
        }],
    }
    columns = [
        _column("Phase", ".status.phase", "string"),
        _column("Maps Done", ".status.mapsDone"),
        _column("Maps", ".status.maps"),
        _column("Reduces Done", ".status.reducesDone"),
        _column("Reduces", ".status.reduces"),
        _column("Workers", ".spec.workers", priority=1),
        _column("Image", ".spec.image", "string", priority=1),
        _AGE,
    ]
    return _crd(JOB_KIND, JOB_PLURAL, "mrj", schema, columns, status_subresource=True)


def _task_status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "The task's protocol record (kubemr_async.protocol.new_task).",
        "required": ["kind", "index", "input", "range", "state", "attempt", "failures",
                     "worker", "leaseExpires", "outputs", "error", "seq"],
        "properties": {
            "kind": {"type": "string", "enum": [k.value for k in TaskKind]},
            "index": _int(0),
            "input": {"type": "string", "nullable": True},
            "range": {
                "type": "array",
                "nullable": True,
                "description": "Byte range [start, end) of the input this map reads.",
                "items": {"type": "integer", "format": "int64"},
                "minItems": 2,
                "maxItems": 2,
                "x-kubernetes-list-type": "atomic",
            },
            "moreSplits": {
                "type": "array",
                "description": "A batched map's splits after its first (input, range), in "
                               "planning order (spec.splitsPerTask).",
                "maxItems": MAX_SPLITS_PER_TASK - 1,
                "items": {"type": "object", "required": ["input"], "properties": {
                    "input": {"type": "string"},
                    "range": {"type": "array", "items": {"type": "integer", "format": "int64"},
                              "minItems": 2, "maxItems": 2,
                              "x-kubernetes-list-type": "atomic"},
                }},
                "x-kubernetes-list-type": "atomic",
            },
            "state": {"type": "string", "enum": [s.value for s in TaskState]},
            "attempt": _int(0),
            "failures": _int(0),
            "worker": {"type": "string"},
            "leaseExpires": {"type": "number", "description": "Unix time the lease ends."},
            "outputs": {
                "nullable": True,
                "description": "Committed outputs: a map's {partition: key}, a reduce's URL.",
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "error": {"type": "string"},
            "seq": _int(0),
            "step": _int(1, MAX_STEPS - 1, doc="The step (0-based) of a multi-step job this "
                                               "task belongs to; unset: the first."),
            "counters": _counters_schema(
                "The committed attempt's counters, {group: {name: amount}}.", per_task=True),
            "skipped": _skipped_schema(
                "Skip mode: a sample of the records the committed attempt skipped.",
                per_task=True),
            "history": _history_schema(),
            **_backup_schema(),
        },
    }


def _history_schema() -> dict[str, Any]:
    """The task's latest attempts (``records.Attempt``), bounded as protocol bounds them."""
    return {
        "type": "array",
        "description": "The latest attempts, oldest first: worker, start and end (Unix ms, "
                       "the writer's clock) and outcome.",
        "maxItems": MAX_HISTORY,
        "items": {"type": "object", "required": ["attempt", "worker", "start"], "properties": {
            "attempt": _int(1),
            "worker": {"type": "string"},
            "start": _int(0, fmt="int64"),
            "end": _int(0, fmt="int64"),
            "outcome": {"type": "string", "enum": [o.value for o in AttemptOutcome]},
        }},
        "x-kubernetes-list-type": "atomic",
    }


def _backup_schema() -> dict[str, Any]:
    """A task's speculative-execution fields (``protocol.backup``)."""
    return {
        "twin": {"type": "object", "nullable": True, "required": ["worker", "attempt"],
                 "description": "The original attempt, running beside a backup.",
                 "properties": {"worker": {"type": "string"}, "attempt": _int(1)}},
        "backups": _int(0, doc="Backup attempts launched for this task."),
        "backupAttempt": _int(1, doc="The latest backup's attempt number."),
        "backupWon": {"type": "boolean",
                      "description": "Committed: whether the backup's commit won."},
    }


def task_crd() -> dict[str, Any]:
    """The MapReduceTask CRD: one small object per task, record under ``.status``.

    No status subresource: the record is the whole object's purpose, so workers patch the
    object itself and need only one verb on one resource.
    """
    schema = {
        "type": "object",
        "description": "One task of a MapReduceJob (internal; written by workers).",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "status": _task_status_schema(),
        },
    }
    columns = [
        _column("State", ".status.state", "string"),
        _column("Attempt", ".status.attempt"),
        _column("Worker", ".status.worker", "string"),
        _column("Kind", ".status.kind", "string", priority=1),
        _column("Input", ".status.input", "string", priority=1),
        _AGE,
    ]
    return _crd(TASK_KIND, TASK_PLURAL, "mrt", schema, columns, status_subresource=False)


def manifests() -> dict[str, dict[str, Any]]:
    """File name under ``charts/kubemr-async/crds/`` -> CRD, for writing and drift checks."""
    return {f"{JOB_PLURAL}.yaml": job_crd(), f"{TASK_PLURAL}.yaml": task_crd()}


def render(crd: dict[str, Any]) -> str:
    """The YAML text a manifest file holds (stable key order, so diffs stay readable)."""
    header = "# Generated by `python -m kubemr_async.crd --write`; do not edit by hand.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=100)


class CRDNotEstablished(KubemrError):
    """The API server did not accept or serve a CRD in time; the message says which."""


async def ensure_crds(kube: Kube, wait_seconds: float = 60.0) -> None:
    """Install or update both CRDs (server-side apply) and wait until they are served.

    Idempotent and safe to run concurrently (the operator calls it on every start): an
    apply of unchanged manifests changes nothing on the server.
    """
    for crd in manifests().values():
        name = crd["metadata"]["name"]
        await kube.patch(CRDS, name, crd, content_type=APPLY_PATCH,
                         query={"fieldManager": FIELD_MANAGER, "force": True},
                         context=f"installing CRD {name}")
        await _wait_established(kube, name, wait_seconds)


async def _wait_established(kube: Kube, name: str, wait_seconds: float) -> None:
    conditions: dict[str, Any] = {}
    with anyio.move_on_after(wait_seconds):
        while conditions.get("Established", {}).get("status") != "True":
            if conditions:
                await anyio.sleep(0.1)
            crd: KubeObject = await kube.get(CRDS, name)
            conditions = {c["type"]: c
                          for c in (crd.get("status") or {}).get("conditions") or []}
            conditions.setdefault("Established", {"status": "Unknown"})
        return
    reasons = "; ".join(f"{t}={c.get('status')}: {c.get('message', '')}"
                        for t, c in conditions.items())
    raise CRDNotEstablished(f"CRD {name} not established after {wait_seconds}s: {reasons}")


def main(argv: list[str] | None = None) -> int:
    import argparse  # here: every CLI command imports this module, and none needs it

    parser = argparse.ArgumentParser(description="Print or write the kubemr-async CRDs.")
    parser.add_argument("--write", action="store_true",
                        help=f"write the manifests into {CRD_DIR}")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the files in the chart differ from the generated ones")
    args = parser.parse_args(argv)
    stale = []
    for file_name, crd in manifests().items():
        path, text = CRD_DIR / file_name, render(crd)
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            sys.stdout.write("---\n" + text)
    if stale:
        print(f"stale CRD manifests (run python -m kubemr_async.crd --write): {stale}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
