"""MapReduceJob manifests as the CLI writes and reads them (``kubemr submit``).

Built from flags (:func:`build_manifest`) or read from a file (:func:`load_manifest`),
each validated by :class:`~kubemr_async.spec.JobSpec`, so a bad flag or field fails here in
one line naming it, in the words the API server would use, before anything is sent.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import spec as defaults
from .crd import API_VERSION, JOB_KIND
from .errors import JobDefinitionError, UsageError
from .kube import KubeObject
from .spec import InvalidSpec, JobSpec, OutputFormat

#: The API server appends 5 characters to a generateName and caps names at 63.
_GENERATE_NAME = re.compile(r"^[a-z0-9][-a-z0-9]{0,57}$")


def load_manifest(text: str, source: str) -> KubeObject:
    """The one MapReduceJob in YAML ``text``; UsageError naming ``source`` otherwise."""
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None
    if len(docs) != 1:
        raise UsageError(f"{source}: expected one MapReduceJob, found {len(docs)} documents")
    manifest = docs[0]
    if not isinstance(manifest, dict):
        raise UsageError(f"{source}: expected a MapReduceJob object, got "
                         f"{type(manifest).__name__}")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != JOB_KIND:
        raise UsageError(f"{source}: expected apiVersion {API_VERSION}, kind {JOB_KIND}; got "
                         f"{manifest.get('apiVersion')}, {manifest.get('kind')}")
    meta = manifest.get("metadata")
    if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
        raise UsageError(f"{source}: metadata.name or metadata.generateName is required")
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        raise UsageError(f"{source}: spec is required")
    # What the API server would refuse, refused here in the words it would use.
    name = meta.get("name") or f"{meta['generateName']}00000"  # a generated name's shape
    try:
        JobSpec.from_resource(str(name), spec)
    except InvalidSpec as exc:
        raise UsageError(f"invalid MapReduceJob {job_label(meta)}: {exc}") from None
    return manifest


def job_label(meta: Mapping[str, Any]) -> str:
    """How messages name a MapReduceJob that may not have its name yet (``wordcount-*``)."""
    return str(meta.get("name") or f"{meta.get('generateName', '')}*")


def manifest_namespace(manifest: Mapping[str, Any], flag: str | None) -> str | None:
    """The namespace to create in: ``-n`` or the manifest's, which must agree (as kubectl)."""
    own = (manifest.get("metadata") or {}).get("namespace")
    if own and flag and own != flag:
        raise UsageError(f"the manifest's namespace {own!r} does not match --namespace {flag!r}")
    return flag or own or None


@dataclass(frozen=True)
class SubmitOptions:
    """A job described by ``kubemr submit`` flags instead of a manifest."""

    image: str
    job: str
    inputs: Sequence[str]
    output: str
    name: str | None = None
    generate_name: str | None = None
    workers: int = defaults.DEFAULT_WORKERS
    reducers: int = defaults.DEFAULT_REDUCERS
    max_attempts: int = defaults.DEFAULT_MAX_ATTEMPTS
    args: Mapping[str, str] | None = None
    split_inputs: bool = True
    chunk_size: int = defaults.DEFAULT_CHUNK_SIZE
    lease_seconds: float = defaults.DEFAULT_LEASE_SECONDS
    output_format: OutputFormat = defaults.DEFAULT_OUTPUT_FORMAT
    mapper: str | None = None
    combiner: str | None = None
    reducer: str | None = None
    max_skipped_records: int = 0
    splits_per_task: int = 1
    task_timeout: float | None = None
    #: The job's own storage credentials (spec.storage): a Secret in its namespace, or
    #: workload-identity annotations for its ServiceAccount.
    credentials_secret: str | None = None
    identity: Mapping[str, str] | None = None


def build_manifest(options: SubmitOptions) -> KubeObject:
    """The MapReduceJob that ``options`` describe; UsageError naming the bad flag.

    The spec is validated by :class:`JobSpec` (every rule of the CRD, as ``kubemr run`` and
    the operator apply them), so bad flags fail here in one line naming the spec field rather
    than as a rejected object; the spec is written out whole, so the manifest says everything
    the job will do.
    Without a name, the job module's last component becomes the ``generateName`` prefix.
    """
    if options.name and options.generate_name:
        raise UsageError("--name and --generate-name cannot be used together")
    prefix = options.generate_name or (None if options.name else _name_prefix(options.job))
    if prefix is not None and not _GENERATE_NAME.match(prefix):
        raise UsageError(f"--generate-name {prefix!r} is invalid: use lowercase letters, "
                         "digits and '-', starting with a letter or digit, at most 58 "
                         "characters")
    counts = _step_reducers(options)
    spec = JobSpec(
        name=options.name or f"{prefix}00000",  # the shape of a generated name
        job=options.job, inputs=tuple(options.inputs),
        reducers=counts[0] if counts else options.reducers,
        steps=len(counts) or 1, step_reducers=counts,
        max_attempts=options.max_attempts, args=dict(options.args or {}),
        output=options.output, split_inputs=options.split_inputs,
        chunk_size=options.chunk_size, lease_seconds=options.lease_seconds,
        output_format=options.output_format, image=options.image, workers=options.workers,
        mapper=options.mapper, combiner=options.combiner, reducer=options.reducer,
        max_skipped_records=options.max_skipped_records,
        splits_per_task=options.splits_per_task, task_timeout=options.task_timeout,
        credentials_secret=options.credentials_secret, identity_annotations=options.identity,
    ).to_dict()
    metadata = {"name": options.name} if options.name else {"generateName": prefix}
    return {"apiVersion": API_VERSION, "kind": JOB_KIND, "metadata": metadata, "spec": spec}


def _step_reducers(options: SubmitOptions) -> tuple[int, ...]:
    """Each step's reducer count if the job module is a Pipeline found here, else ();
    InvalidSpec if it is a low-level job asked to batch its inputs (``splitsPerTask``).

    A Pipeline runs as one MapReduceJob whose operator plans each step, so the spec names
    the steps and their reducers. The image's copy of the module is the one that runs: one
    that is not here, or does not load here, is left to the workers, which fail the job in
    one line (a broken module as always; a pipeline whose spec lacks ``steps`` saying so).
    """
    origin = _module_origin(options.job) if options.job else None
    if origin is None:
        return ()
    if options.splits_per_task == 1 and not _may_be_pipeline(origin):
        return ()
    # Imported only now: it brings pyarrow and numpy (~0.3 s), which a submit of a module
    # that lives only in the image, or of a plain job, never needs.
    from .api import Commands, pipeline_reducers

    commands = Commands(options.mapper, options.combiner, options.reducer)
    try:
        return pipeline_reducers(options.job, options.reducers, commands,
                                 options.splits_per_task)
    except JobDefinitionError:
        return ()


def _may_be_pipeline(origin: str) -> bool:
    """Whether the job module at ``origin`` (see _module_origin) may define a Pipeline:
    its source mentions one (any case: ``Pipeline(...)``, a ``make_pipeline()`` helper),
    or it has no source to read.

    Importing a module costs ~0.2 s (the job API brings pyarrow and numpy), most of a
    `kubemr submit` of a plain job, which has nothing for submit to fill in. A module that
    gets its pipeline without naming one fails on the workers in one line saying to give
    ``spec.steps``; naming it in a comment is enough to have submit fill it in."""
    if not origin.endswith(".py"):
        return True
    try:
        return b"pipeline" in Path(origin).read_bytes().lower()
    except OSError:
        return True


def _module_origin(ref: str) -> str | None:
    """Where job module ``ref`` is here, without importing it: its file (a path given, or
    an importable module's origin; "" for a module without one), or None if it is not
    here: `kubemr submit` names modules that may exist only in the worker image."""
    target = ref if ref.endswith(".py") else ref.partition(":")[0]
    if target.endswith(".py") or "/" in target:
        return target if Path(target).is_file() else None
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError):  # a parent package missing, or an invalid name
        return None
    return None if spec is None else spec.origin or ""


def _name_prefix(job: str) -> str:
    """``examples.wordcount`` / ``/app/wordcount.py`` / ``pkg.mod:job`` -> ``wordcount-``."""
    stem = re.split(r"[./:]", job.removesuffix(".py").rstrip("/"))[-1] if job else "streaming"
    cleaned = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:57]
    return f"{cleaned or 'job'}-"
