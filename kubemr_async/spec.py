"""The job specification shared by every backend: what to run, on what, with which limits.

:class:`JobSpec` is the one model of a ``MapReduceJob``'s ``spec``: ``to_dict``/``from_dict``
are the one mapping to and from the resource's camelCase spelling, and :func:`validate` checks
every limit the CRD schema has, from the constants below, which :mod:`kubemr_async.crd` also
builds the schema from. So `kubemr run`, `kubemr submit`, the operator and the API server
refuse the same values, and each message names the spec field (as the API server does).

The job record of every store keeps the part a worker needs (``to_dict(cluster=False)``);
``image``, ``workers``, ``template`` and ``ttlSecondsAfterFinished`` only shape a job on a
cluster, so they may be unset (None) for `kubemr run`, but when set the limits are the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, cast

from .errors import UsageError

T = TypeVar("T")

MIB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 64 * MIB
MIN_CHUNK_SIZE = 1
#: A worker's memory budget for the shuffle (spec ``memory``, ``kubemr run --memory``) when
#: neither the spec nor a container memory limit gives one.
DEFAULT_MEMORY = 512 * MIB
#: Below this a budget cannot hold a merge pass's blocks and one output chunk.
MIN_MEMORY = 16 * MIB
#: What a worker process needs besides its budget (interpreter, numpy, Arrow, clients);
#: a container's memory limit minus this is the default budget on Kubernetes.
MEMORY_HEADROOM = 192 * MIB
#: The environment every worker process starts with (a user's own setting wins). glibc
#: gives each thread that allocates its own malloc arena (up to 8 per core) and keeps what
#: each frees: a worker's event loop, user-code thread and I/O threads each held tens of
#: MiB of freed buffers, and a 1 GiB sort at a 256 MiB budget peaked at 462 MiB RSS per
#: worker instead of 348 MiB with two arenas, at the same speed (benchmarks/README.md).
WORKER_PROCESS_ENV: dict[str, str] = {"MALLOC_ARENA_MAX": "2"}
#: A warm pool's standby worker (operator.pool) is told its pod's name by this variable,
#: and waits for the operator to write the job it adopts it for, as ``namespace/name``,
#: in this annotation of its pod.
STANDBY_POD_ENV = "KUBEMR_STANDBY_POD"
STANDBY_NAMESPACE_ENV = "KUBEMR_STANDBY_NAMESPACE"
ADOPTED_ANNOTATION = "kubemr.io/adopted-by"
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 100
#: Batching tiny tasks: consecutive input splits one map record holds (``splitsPerTask``).
#: Each split past the first costs its record one ``{"input", "range"}`` entry: ~100 bytes
#: with a typical 60-character URL, ~1.13 KB with S3's longest (a 63-character bucket and
#: a 1,024-byte key), so at the cap a record is 581 KB (measured on the API server), well
#: inside etcd's 1.5 MiB request limit and the API server's 3 MiB body limit, while the
#: writes per split already fall 512-fold. The record travels in every watch event of its
#: claim, renewals and commit, which is why the cap is not higher.
MAX_SPLITS_PER_TASK = 512
#: Skip mode (kubemr_async.skips): bad records skipped per task; 0, the default, is off.
MAX_SKIPPED_RECORDS_LIMIT = 2**31 - 1
DEFAULT_LEASE_SECONDS = 30.0
MIN_LEASE_SECONDS = 1
#: The field of the per-task timeout, which every timeout error names.
TASK_TIMEOUT_FIELD = "spec.taskTimeoutSeconds"
#: The largest byte count (``chunkSize``, ``memory``): the CRD's ``int64`` format, and
#: what the JSON of a job record can hold.
MAX_BYTES = 2**63 - 1
#: One default for `kubemr run`, `kubemr submit` and the CRD: one result file per job.
DEFAULT_REDUCERS = 1
MAX_REDUCERS = 10_000
DEFAULT_WORKERS = 2
#: The most steps a multi-step job (api.Pipeline) may have.
MAX_STEPS = 100
MAX_WORKERS = 1000
#: Task names are ``<job>-<key>`` and the job name is a label value, so it must be a DNS label.
MAX_JOB_NAME = 63
#: An S3 URL: bucket name rules (3-63 chars, lowercase, digits, '.', '-') plus an optional key.
OUTPUT_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"

#: What a MapReduceJob must give (the CRD's ``required``), besides a job module or a mapper
#: command (``job`` or ``mapper``: the CRD says so in a rule); `kubemr run` needs inputs.
RESOURCE_REQUIRED = ("image", "inputs", "output")
#: Workload identity: the ServiceAccount annotations a job may put on its workers' account
#: (``spec.storage.serviceAccountAnnotations``), and nothing else. Each only tells the
#: cloud's identity webhook which role the pods assume; a tenant's IAM trust policy decides
#: whether that role trusts this namespace's account.
EKS_ROLE_ARN = "eks.amazonaws.com/role-arn"
AZURE_CLIENT_ID = "azure.workload.identity/client-id"
IDENTITY_ANNOTATIONS = (EKS_ROLE_ARN, "iam.gke.io/gcp-service-account", AZURE_CLIENT_ID)
#: What a job's ``template`` may never set, in any namespace: the workers' identity (the
#: operator's per-job account, whose Role reaches only this job) and the worker
#: container's image (that is ``image``) and command (kubemr's). The CRD refuses them at
#: admission and the operator again before it creates anything.
TEMPLATE_IDENTITY_FIELDS = ("serviceAccountName", "serviceAccount",
                            "automountServiceAccountToken")
TEMPLATE_WORKER_FIELDS = ("image", "command", "args")
#: A Secret's name (RFC 1123 subdomain), for ``spec.storage.credentialsSecret``.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
#: The shell-command steps (Hadoop Streaming), in the resource's spelling.
COMMAND_FIELDS = ("mapper", "combiner", "reducer")

#: How result parts are written (see kubemr_async.formats); the one list of valid formats.
OutputFormat = Literal["text", "jsonl", "parquet"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("text", "jsonl", "parquet")
DEFAULT_OUTPUT_FORMAT: OutputFormat = "text"
#: What a part may be written as: an output format, or ``pairs``, the lossless Parquet
#: that every step of a multi-step job but the last writes (kubemr_async.formats).
PartFormat = OutputFormat | Literal["pairs"]

#: RFC 1123 label: Kubernetes object names derived from the job name must stay valid.
NAME_PATTERN = rf"^[a-z0-9]([-a-z0-9]{{0,{MAX_JOB_NAME - 2}}}[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)


class JobSpecDict(TypedDict):
    """A ``MapReduceJob``'s ``spec`` as the resource (and every job record) spells it."""

    job: NotRequired[str]  # absent for a job of shell commands only (``mapper``)
    inputs: list[str]
    reducers: int
    maxAttempts: int
    leaseSeconds: float
    chunkSize: int
    args: dict[str, str]
    output: str
    splitInputs: bool
    outputFormat: OutputFormat
    memory: NotRequired[int]
    maxSkippedRecords: NotRequired[int]
    splitsPerTask: NotRequired[int]
    mapper: NotRequired[str]
    combiner: NotRequired[str]
    reducer: NotRequired[str]
    image: NotRequired[str]
    workers: NotRequired[int]
    template: NotRequired[dict[str, Any]]
    storage: NotRequired[dict[str, Any]]
    ttlSecondsAfterFinished: NotRequired[int]
    steps: NotRequired[int]
    stepReducers: NotRequired[list[int]]
    step: NotRequired[int]
    speculative: NotRequired[bool]
    taskTimeoutSeconds: NotRequired[float]


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to know about a job, fixed when the job is created."""

    name: str
    job: str
    inputs: tuple[str, ...]
    reducers: int = DEFAULT_REDUCERS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    chunk_size: int = DEFAULT_CHUNK_SIZE
    args: Mapping[str, str] = field(default_factory=dict)
    output: str = ""
    # Key/value jobs read their inputs as data, cut into line-aligned chunks; low-level
    # JobWorker jobs get each input string verbatim (one map per string).
    split_inputs: bool = True
    output_format: OutputFormat = DEFAULT_OUTPUT_FORMAT
    # Bytes of memory each worker's shuffle stays within (None: the container's limit
    # minus MEMORY_HEADROOM on Kubernetes, else DEFAULT_MEMORY; see memory_budget).
    memory: int | None = None
    # Skip mode: a task skips up to this many records (or reduce keys) whose call raises
    # or that do not parse, instead of failing (kubemr_async.skips); 0 is off.
    max_skipped_records: int = 0
    # Batching tiny tasks: a map record holds up to this many consecutive splits, mapped
    # one after another in one attempt into one shuffle object (protocol.plan), so the
    # coordination writes (claim, renewals, commit) are paid once per batch, not per split.
    splits_per_task: int = 1
    # Backup tasks (speculative execution): an idle worker may start a second attempt of a
    # straggling task, the first to commit wins (protocol.JobView.backup_candidate).
    speculative: bool = True
    # Seconds an attempt's work (its reads, callbacks and writes) may take before it fails
    # as timed out (Hadoop's mapreduce.task.timeout); None: no limit. A hung callback
    # otherwise keeps its lease renewed, and so its task running, for ever.
    task_timeout: float | None = None
    # Shell commands for the steps (Hadoop Streaming; kubemr_async.streaming): they replace
    # the job module's steps, or are the whole job when ``job`` is empty.
    mapper: str | None = None
    combiner: str | None = None
    reducer: str | None = None
    # A multi-step job (api.Pipeline): its number of steps, and the step (0-based) this
    # spec's tasks run; `kubemr run` runs step after step, each its own record set.
    steps: int = 1
    step: int = 0
    # Each step's reducer count, when the job is planned step by step without its module
    # (a MapReduceJob: the operator plans every step); empty: every step has ``reducers``.
    # ``reducers`` is always the count of ``step`` (see at_step).
    step_reducers: tuple[int, ...] = ()
    # Cluster-only: the worker image, worker pods, pod template overrides, clean-up delay.
    image: str | None = None
    workers: int | None = None
    template: Mapping[str, Any] | None = None
    ttl_seconds_after_finished: int | None = None
    # Cluster-only: the workers' storage credentials, the tenant's own (spec.storage): a
    # Secret in the job's namespace, or workload-identity annotations on its account.
    credentials_secret: str | None = None
    identity_annotations: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        validate(self)

    def at_step(self, step: int) -> JobSpec:
        """This job's spec for step ``step`` (0-based): its ``step`` and its reducer count."""
        reducers = self.step_reducers[step] if self.step_reducers else self.reducers
        return replace(self, step=step, reducers=reducers)

    @property
    def part_format(self) -> PartFormat:
        """How this spec's parts are written: the output format for the last step, else
        ``pairs`` (the next step's input, never published)."""
        return "pairs" if self.step < self.steps - 1 else self.output_format

    def to_dict(self, *, cluster: bool = True) -> JobSpecDict:
        """The resource's spec; ``cluster=False`` leaves out the cluster-only fields (the
        job record's copy: workers never read them, and a store may fill them in)."""
        spec: JobSpecDict = {
            "inputs": list(self.inputs),
            "reducers": self.reducers,
            "maxAttempts": self.max_attempts,
            "leaseSeconds": self.lease_seconds,
            "chunkSize": self.chunk_size,
            "args": dict(self.args),
            "output": self.output,
            "splitInputs": self.split_inputs,
            "outputFormat": self.output_format,
        }
        if self.job:
            spec["job"] = self.job
        if self.memory is not None:
            spec["memory"] = self.memory
        if self.max_skipped_records:
            spec["maxSkippedRecords"] = self.max_skipped_records
        if self.splits_per_task != 1:  # absent: the default, one split per map
            spec["splitsPerTask"] = self.splits_per_task
        if not self.speculative:  # absent: the default, on
            spec["speculative"] = False
        if self.task_timeout is not None:
            spec["taskTimeoutSeconds"] = self.task_timeout
        if self.mapper is not None:
            spec["mapper"] = self.mapper
        if self.combiner is not None:
            spec["combiner"] = self.combiner
        if self.reducer is not None:
            spec["reducer"] = self.reducer
        if self.steps != 1:
            spec["steps"] = self.steps
        if self.step_reducers:
            spec["stepReducers"] = list(self.step_reducers)
        if self.step != 0:
            spec["step"] = self.step
        if cluster:
            if self.image is not None:
                spec["image"] = self.image
            if self.workers is not None:
                spec["workers"] = self.workers
            if self.template is not None:
                spec["template"] = dict(self.template)
            if self.ttl_seconds_after_finished is not None:
                spec["ttlSecondsAfterFinished"] = self.ttl_seconds_after_finished
            storage: dict[str, Any] = {}
            if self.credentials_secret is not None:
                storage["credentialsSecret"] = self.credentials_secret
            if self.identity_annotations is not None:
                storage["serviceAccountAnnotations"] = dict(self.identity_annotations)
            if storage:
                spec["storage"] = storage
        return spec

    @classmethod
    def from_resource(cls, name: str, data: Mapping[str, Any]) -> JobSpec:
        """A MapReduceJob's spec judged as the API server would: the fields it requires
        given, values of the right kind, every limit; InvalidSpec naming the field."""
        missing = next((f for f in RESOURCE_REQUIRED if f not in data), None)
        if missing is not None:
            raise InvalidSpec(f"spec.{missing}", "required")
        try:
            return cls.from_dict(name, data)
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec", str(exc)) from None

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> JobSpec:
        """Read a resource's spec (or a job record's); defaults are the CRD's.

        Values must already have the schema's types (InvalidSpec naming the field if not):
        coercing would accept what the API server refuses (``splitInputs: "false"`` would
        read as true, ``inputs: "s3://b/x"`` as one input per character).
        """
        ttl = _optional(data, "ttlSecondsAfterFinished", _int)
        # Keyed by their paths below spec, so a wrong type's message names the field.
        storage = {f"storage.{k}": v for k, v in
                   (_optional(data, "storage", _object) or {}).items()}
        return cls(
            name=name,
            job=_str(data, "job", ""),
            inputs=tuple(_str_list(data, "inputs")),
            reducers=_int(data, "reducers", DEFAULT_REDUCERS),
            max_attempts=_int(data, "maxAttempts", DEFAULT_MAX_ATTEMPTS),
            lease_seconds=_number(data, "leaseSeconds", DEFAULT_LEASE_SECONDS),
            chunk_size=_int(data, "chunkSize", DEFAULT_CHUNK_SIZE),
            args=_str_map(data, "args"),
            output=_str(data, "output", ""),
            split_inputs=_bool(data, "splitInputs", True),
            output_format=cast(OutputFormat, _str(data, "outputFormat", DEFAULT_OUTPUT_FORMAT)),
            memory=_optional(data, "memory", _int),
            max_skipped_records=_int(data, "maxSkippedRecords", 0),
            splits_per_task=_int(data, "splitsPerTask", 1),
            speculative=_bool(data, "speculative", True),
            task_timeout=_optional(data, "taskTimeoutSeconds", _number),
            mapper=_optional(data, "mapper", _str),
            combiner=_optional(data, "combiner", _str),
            reducer=_optional(data, "reducer", _str),
            steps=_int(data, "steps", 1),
            step=_int(data, "step", 0),
            step_reducers=tuple(_int_list(data, "stepReducers")),
            image=_optional(data, "image", _str),
            workers=_optional(data, "workers", _int),
            template=_optional(data, "template", _object),
            ttl_seconds_after_finished=ttl,
            credentials_secret=_optional(storage, "storage.credentialsSecret", _str),
            identity_annotations=_optional(storage, "storage.serviceAccountAnnotations",
                                           lambda d, f, _: _str_map(d, f)),
        )


# --- reading typed values out of a decoded spec --------------------------------------

def _wrong(field: str, kind: str, value: object) -> InvalidSpec:
    return InvalidSpec(f"spec.{field}", f"must be {kind}, got {type(value).__name__} "
                                        f"{value!r:.60}")


def _str(data: Mapping[str, Any], field: str, default: str) -> str:
    value = data.get(field, default)
    if not isinstance(value, str):
        raise _wrong(field, "a string", value)
    return value


def _int(data: Mapping[str, Any], field: str, default: int) -> int:
    value = data.get(field, default)
    # bool is an int in Python, not in JSON; 3.0 is an integer to a JSON schema.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong(field, "an integer", value)
    return value


def _number(data: Mapping[str, Any], field: str, default: float) -> float:
    value = data.get(field, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _wrong(field, "a number", value)
    return float(value)


def _bool(data: Mapping[str, Any], field: str, default: bool) -> bool:
    value = data.get(field, default)
    if not isinstance(value, bool):
        raise _wrong(field, "true or false", value)
    return value


def _str_list(data: Mapping[str, Any], field: str) -> list[str]:
    value = data.get(field, [])
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _wrong(field, "a list of strings", value)
    return list(value)


def _int_list(data: Mapping[str, Any], field: str) -> list[int]:
    value = data.get(field, [])
    if not isinstance(value, list | tuple):
        raise _wrong(field, "a list of integers", value)
    return [_int({field: item}, field, 0) for item in value]


def _str_map(data: Mapping[str, Any], field: str) -> dict[str, str]:
    value = data.get(field) or {}
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _wrong(field, "a map of strings to strings", value)
    return dict(value)


def _object(data: Mapping[str, Any], field: str, default: dict[str, Any]) -> dict[str, Any]:
    value = data.get(field, default)
    if not isinstance(value, Mapping):
        raise _wrong(field, "an object", value)
    return dict(value)


def _optional(data: Mapping[str, Any], field: str,
              read: Callable[[Mapping[str, Any], str, Any], T]) -> T | None:
    """``read``'s value, or None where the field is absent or null (a cluster-only field)."""
    return None if data.get(field) is None else read(data, field, None)


class InvalidSpec(UsageError):
    """A spec value breaks a limit; ``field`` is its path in the resource (``spec.reducers``,
    ``metadata.name``), as the API server names it, so every surface says the same."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _between(field: str, value: float, low: float, high: float | None = None,
             note: str = "") -> None:
    if value < low or (high is not None and value > high):
        limits = (f"between {_num(low)}{note} and {_num(high)}" if high is not None
                  else f"at least {_num(low)}")
        raise InvalidSpec(f"spec.{field}", f"must be {limits}, got {_num(value)}")


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def validate(spec: JobSpec) -> None:
    """Raise InvalidSpec naming the first invalid field: every rule of the CRD schema."""
    if not _NAME.match(spec.name):
        raise InvalidSpec("metadata.name", f"{spec.name!r} is invalid: use lowercase letters, "
                          f"digits and '-', at most {MAX_JOB_NAME} characters")
    for name in COMMAND_FIELDS:
        if getattr(spec, name) is not None and not getattr(spec, name).strip():
            raise InvalidSpec(f"spec.{name}", "a shell command must not be empty")
    if not spec.job and spec.mapper is None:
        raise InvalidSpec("spec.job", "a job module (or spec.mapper, a shell command) is "
                          "required")
    if not spec.inputs:
        raise InvalidSpec("spec.inputs", "at least one input is required")
    if not all(spec.inputs):
        raise InvalidSpec("spec.inputs", "an input must not be empty")
    _between("reducers", spec.reducers, 0, MAX_REDUCERS, " (map-only)")
    _between("steps", spec.steps, 1, MAX_STEPS)
    if not 0 <= spec.step < spec.steps:
        raise InvalidSpec("spec.step", f"must be between 0 and {spec.steps - 1} (the job has "
                          f"{spec.steps} steps), got {spec.step}")
    _check_step_reducers(spec)
    _between("maxAttempts", spec.max_attempts, 1, MAX_ATTEMPTS_LIMIT)
    if not math.isfinite(spec.lease_seconds):  # NaN passes every comparison; JSON holds neither
        raise InvalidSpec("spec.leaseSeconds", f"must be a finite number, got "
                          f"{spec.lease_seconds}")
    _between("leaseSeconds", spec.lease_seconds, MIN_LEASE_SECONDS)
    if spec.task_timeout is not None and not (math.isfinite(spec.task_timeout)
                                              and spec.task_timeout > 0):
        raise InvalidSpec(TASK_TIMEOUT_FIELD, f"must be a number of seconds above 0, got "
                          f"{_num(spec.task_timeout)}")
    _between("chunkSize", spec.chunk_size, MIN_CHUNK_SIZE)
    if spec.output and not re.match(OUTPUT_PATTERN, spec.output):
        raise InvalidSpec("spec.output", f"must be an S3 URL like s3://bucket/prefix, "
                          f"got {spec.output!r}")
    if spec.output_format not in OUTPUT_FORMATS:
        raise InvalidSpec("spec.outputFormat", f"must be one of {', '.join(OUTPUT_FORMATS)}, "
                          f"got {spec.output_format!r}")
    if spec.memory is not None:
        _between("memory", spec.memory, MIN_MEMORY)
    for name, size in (("chunkSize", spec.chunk_size), ("memory", spec.memory or 0)):
        if size > MAX_BYTES:
            raise InvalidSpec(f"spec.{name}", f"must be at most {MAX_BYTES} (int64), got {size}")
    _between("maxSkippedRecords", spec.max_skipped_records, 0, MAX_SKIPPED_RECORDS_LIMIT)
    _between("splitsPerTask", spec.splits_per_task, 1, MAX_SPLITS_PER_TASK)
    if spec.splits_per_task > 1 and not spec.split_inputs:
        raise InvalidSpec("spec.splitsPerTask", f"must be 1 when spec.splitInputs is false "
                          f"(a low-level JobWorker job maps one input per task), got "
                          f"{spec.splits_per_task}")
    if spec.image is not None and not spec.image:
        raise InvalidSpec("spec.image", "a worker image is required")
    if spec.workers is not None:
        _between("workers", spec.workers, 1, MAX_WORKERS)
    if spec.ttl_seconds_after_finished is not None:
        _between("ttlSecondsAfterFinished", spec.ttl_seconds_after_finished, 0)
    _check_storage(spec)
    _check_text(spec.to_dict())


def _check_text(spec: JobSpecDict) -> None:
    """InvalidSpec naming the field of a string that is not UTF-8 text: a command line's
    bytes that do not decode arrive as surrogates (an ``--arg``, a ``--mapper``), and the
    spec travels as JSON, which holds only text."""
    for name, value in spec.items():
        for text in _texts(value):
            try:
                text.encode()
            except UnicodeEncodeError:
                raise InvalidSpec(f"spec.{name}", f"{text!r} is not valid UTF-8 text") from None


def _texts(value: object) -> Iterator[str]:
    """Every str in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)


def _check_storage(spec: JobSpec) -> None:
    """``storage``: a Secret's name, or allow-listed identity annotations, not both."""
    if spec.credentials_secret is not None and spec.identity_annotations is not None:
        raise InvalidSpec("spec.storage", "give credentialsSecret or "
                          "serviceAccountAnnotations, not both")
    if spec.credentials_secret is not None and not re.match(SECRET_NAME_PATTERN,
                                                            spec.credentials_secret):
        raise InvalidSpec("spec.storage.credentialsSecret",
                          f"{spec.credentials_secret!r:.80} is not a Secret name")
    if spec.identity_annotations is not None:
        if not spec.identity_annotations:
            raise InvalidSpec("spec.storage.serviceAccountAnnotations", "must not be empty")
        for key in spec.identity_annotations:
            if key not in IDENTITY_ANNOTATIONS:
                raise InvalidSpec("spec.storage.serviceAccountAnnotations",
                                  f"{key!r:.80} is not allowed: use one of "
                                  f"{', '.join(IDENTITY_ANNOTATIONS)}")


def _check_step_reducers(spec: JobSpec) -> None:
    """``stepReducers``: one count per step, each a valid ``reducers``, and the spec's own
    step's equal to ``reducers`` (so a reader of either sees the same job)."""
    if not spec.step_reducers:
        return
    if len(spec.step_reducers) != spec.steps:
        raise InvalidSpec("spec.stepReducers", f"must give one count per step ({spec.steps}), "
                          f"got {len(spec.step_reducers)}")
    for index, count in enumerate(spec.step_reducers):
        _between(f"stepReducers[{index}]", count, 0, MAX_REDUCERS, " (map-only)")
    if spec.step_reducers[spec.step] != spec.reducers:
        raise InvalidSpec("spec.reducers", f"must equal spec.stepReducers[{spec.step}] "
                          f"({spec.step_reducers[spec.step]}), got {spec.reducers}")


def parse_size(text: str) -> int:
    """Parse '64MiB', '512k', '1G' or plain bytes; UsageError on anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise UsageError(f"invalid size {text!r}: use bytes or a suffix like 64MiB, 512k, 1G")
    number, unit = int(match.group(1)), match.group(2)
    return int(number * 1024 ** " kmgt".index(unit or " "))


def memory_budget(spec_memory: int | None, container_limit: int | None) -> int:
    """A worker's budget: the spec's, else the container's limit less the interpreter's
    headroom (never below MIN_MEMORY), else DEFAULT_MEMORY."""
    if spec_memory is not None:
        return spec_memory
    if container_limit is not None:
        return max(MIN_MEMORY, container_limit - MEMORY_HEADROOM)
    return DEFAULT_MEMORY
