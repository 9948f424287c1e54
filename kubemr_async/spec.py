"""The job specification shared by every backend: what to run, on what, with which limits.

The same fields appear in the ``MapReduceJob`` custom resource (camelCase in ``spec``) and in
the embedded store's job record, so ``to_dict``/``from_dict`` use the resource's spelling.
Validation lives here so `kubemr run`, the operator and the CRD agree on what is valid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .errors import UsageError

MIB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 64 * MIB
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_SECONDS = 30.0
#: One default for `kubemr run`, `kubemr submit` and the CRD: one result file per job.
DEFAULT_REDUCERS = 1
MAX_REDUCERS = 10_000

#: How result parts are written (see kubemr_async.formats); the one list of valid formats.
OutputFormat = Literal["text", "jsonl", "parquet"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("text", "jsonl", "parquet")
DEFAULT_OUTPUT_FORMAT: OutputFormat = "text"

# RFC 1123 label: Kubernetes object names derived from the job name must stay valid.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


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

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
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

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> JobSpec:
        return cls(
            name=name,
            job=str(data.get("job", "")),
            inputs=tuple(str(i) for i in data.get("inputs", ())),
            reducers=int(data.get("reducers", DEFAULT_REDUCERS)),
            max_attempts=int(data.get("maxAttempts", DEFAULT_MAX_ATTEMPTS)),
            lease_seconds=float(data.get("leaseSeconds", DEFAULT_LEASE_SECONDS)),
            chunk_size=int(data.get("chunkSize", DEFAULT_CHUNK_SIZE)),
            args={str(k): str(v) for k, v in dict(data.get("args") or {}).items()},
            output=str(data.get("output", "")),
            split_inputs=bool(data.get("splitInputs", True)),
            output_format=cast(OutputFormat,
                               str(data.get("outputFormat", DEFAULT_OUTPUT_FORMAT))),
        )


def validate(spec: JobSpec) -> None:
    """Raise UsageError naming the first invalid field; mirrors the CRD schema's rules."""
    if not _NAME.match(spec.name):
        raise UsageError(
            f"job name {spec.name!r} is invalid: use lowercase letters, digits and '-', "
            "at most 63 characters"
        )
    if not spec.job:
        raise UsageError("job: a job module is required")
    if not spec.inputs:
        raise UsageError("inputs: at least one input is required")
    if not 0 <= spec.reducers <= MAX_REDUCERS:
        raise UsageError(f"reducers must be between 0 (map-only) and {MAX_REDUCERS}, "
                         f"got {spec.reducers}")
    if spec.max_attempts < 1:
        raise UsageError(f"maxAttempts must be at least 1, got {spec.max_attempts}")
    if spec.lease_seconds <= 0:
        raise UsageError(f"leaseSeconds must be positive, got {spec.lease_seconds}")
    if spec.chunk_size <= 0:
        raise UsageError(f"chunk size must be positive, got {spec.chunk_size}")
    if spec.output_format not in OUTPUT_FORMATS:
        raise UsageError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, "
                         f"got {spec.output_format!r}")


def parse_size(text: str) -> int:
    """Parse '64MiB', '512k', '1G' or plain bytes; UsageError on anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise UsageError(f"invalid size {text!r}: use bytes or a suffix like 64MiB, 512k, 1G")
    number, unit = int(match.group(1)), match.group(2)
    return int(number * 1024 ** " kmgt".index(unit or " "))
