"""Coordination cost on a real API server, as a job grows from 10 to 10,000 map tasks.

What it runs: a real kube-apiserver v1.36 + etcd + controller-manager on loopback
(``TestCluster``), the CRDs, and for each N a low-level job (``tests.jobs.attempts``: each
map returns its input string, so the job does no blob I/O) with N inputs and
``splitInputs: false``. ``--mode``:

* ``direct`` (default): planning creates the N + R task objects exactly as the operator
  does (``KubeStateStore.create``, then the ``start_job`` patch); then W worker processes
  run ``kubemr_async.pod.run_pod_worker`` (the ``kubemr worker`` entrypoint, same
  environment: KUBEMR_JOB, KUBEMR_NAMESPACE, KUBEMR_WORKER_ID, KUBECONFIG) until the job
  Succeeds. They run as ``python benchmarks/coordination.py _worker``: ``run_pod_worker``
  unchanged, with a store subclass that only counts the watch events it delivers. At the
  end every task object is read back and checked (committed, attempt 1, right output).
* ``plain``: the same with the ``kubemr worker`` console script (no per-worker counts).
* ``operator``: the product path: POST a MapReduceJob, a ``kubemr operator`` process plans
  it and creates the worker Job, the FakeKubelet runs its pods. The operator deletes a
  Succeeded job's tasks at once, so only the results are checked.

What it reports, per N:

* API writes per task, from the API server's own ``/metrics`` (``apiserver_request_total``
  deltas for POST/PATCH on mapreducetasks and mapreducejobs): independent of our code,
  and cross-checked against the workers' ``KubeStateStore.stats``;
* bytes per write (``apiserver_request_body_size_bytes``) and the server's PATCH latency;
* the largest MapReduceTask (map and reduce separately) and the MapReduceJob at the end,
  as served JSON, against etcd's 1.5 MiB limit; map tasks must not grow with N;
* watch events each worker receives (counted in the worker) and what the server sent
  (``apiserver_watch_events_total``/``_sizes``) for tasks and for the job, to show whether
  watch traffic grows linearly with N;
* lost claim races per task (HTTP 422 answers to task PATCHes, as the server counts them);
* wall time of planning and of the job, per task and marginal; CPU per task of the
  workers, the API server, etcd, the controller-manager (and the operator).

``--splits-per-task K`` runs the same sweep on a key/value job whose inputs can be batched
(``tests.jobs.names``: each split is a generated name the map never reads, and only
counts), planned with ``splitsPerTask: K``: N splits in ceil(N / K) map records, so the
coordination writes are paid per record. It needs blob storage (the reduce's part, the
manifest), so an S3 server is started too. The report adds splits/s beside records/s,
task writes per split and API-server CPU per split; every split must be counted exactly
once (the stamped counter). K = 1 is the same job unbatched, the baseline to compare with.
A 100,000-split job: ``--tasks 100000 --splits-per-task 64``.

``--tiny-job N`` instead times a tiny job's ``kubemr submit --wait`` N times (median, each
stage's moment, the CLI's and the worker's CPU): see ``tiny_job_latency``.

    .venv/bin/python benchmarks/coordination.py                   # N = 10, 1000, 10000
    .venv/bin/python benchmarks/coordination.py --mode operator   # the whole product path
    .venv/bin/python benchmarks/coordination.py --tasks 10,1000 --workers 8 --json out.json
    .venv/bin/python benchmarks/coordination.py --tiny-job 5      # submit --wait, to exit

The worker sweep (issue: per-task API server CPU must stay flat as workers grow): one N,
several worker counts, and the bare-PATCH baseline measured first on the same server (4
clients, one guarded PATCH in flight each, on MapReduceTask objects nobody else watches
but the controller-manager): tasks/s of each job is reported against that rate.

    .venv/bin/python benchmarks/coordination.py --tasks 2000 --workers 4,16,64 --bare
    .venv/bin/python benchmarks/coordination.py --tasks 2000 --workers 4,64 --bare \
        --splits-per-task 16                                          # batched tiny tasks
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

# Imported up front so that no import lands inside a timed region.
from kubemr_async import protocol  # noqa: E402
from kubemr_async.crd import MAPREDUCE_TASKS, ensure_crds  # noqa: E402
from kubemr_async.inputs import plan_inputs  # noqa: E402
from kubemr_async.kube import JSON_PATCH, Kube  # noqa: E402
from kubemr_async.spec import ADOPTED_ANNOTATION, MAX_SPLITS_PER_TASK, JobSpec  # noqa: E402
from kubemr_async.state.kube import KubeStateStore  # noqa: E402

GROUP = "kubemr.io"
GROUP_PATH = f"/apis/{GROUP}/v1alpha1"
JOB_MODULE = "tests.jobs.attempts"
#: The key/value job of ``--splits-per-task`` (inputs that can be batched).
BATCHED_MODULE = "tests.jobs.names"
#: The output URL must pass the CRD's pattern; nothing is ever written there.
OUTPUT = "s3://kubemr-bench/coordination"
ETCD_LIMIT = 1536 * 1024  # etcd's default --max-request-bytes
DECIDED = ("Succeeded", "Failed", "Cancelled")
#: The task whose size is compared across N (every N >= 10 has it).
PROBE_INDEX = 7


# --- the API server's metrics ----------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str, prefixes: tuple[str, ...]) -> Samples:
    """The samples of the Prometheus text format whose names start with ``prefixes``."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


@dataclass
class Metrics:
    """A snapshot of the API server counters this benchmark reads."""

    samples: Samples

    def total(self, name: str, **labels: str | tuple[str, ...]) -> float:
        """Sum of ``name`` over the samples whose labels match (a tuple: any of)."""
        wanted = {k: (v,) if isinstance(v, str) else v for k, v in labels.items()}
        result = 0.0
        for (sample, sample_labels), value in self.samples.items():
            if sample != name:
                continue
            have = dict(sample_labels)
            if all(have.get(k) in allowed for k, allowed in wanted.items()):
                result += value
        return result

    def __sub__(self, before: Metrics) -> Metrics:
        keys = self.samples.keys() | before.samples.keys()
        return Metrics({k: self.samples.get(k, 0.0) - before.samples.get(k, 0.0) for k in keys})


class Server:
    """Plain HTTPS access to the test cluster as admin (independent of the code measured)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self._ssl = ssl.create_default_context(cafile=str(cluster.ca_file))

    def metrics(self) -> Metrics:
        request = urllib.request.Request(
            f"{self.cluster.server}/metrics",
            headers={"Authorization": f"Bearer {self.cluster.admin_token}"})
        with urllib.request.urlopen(request, context=self._ssl, timeout=60) as resp:
            text = resp.read().decode()
        return Metrics(parse_metrics(text, ("apiserver_request_total",
                                            "apiserver_longrunning_requests",
                                            "apiserver_request_body_size_bytes",
                                            "apiserver_request_duration_seconds_sum",
                                            "apiserver_request_duration_seconds_count",
                                            "apiserver_watch_events")))

    def list_all(self, path: str) -> list[dict[str, Any]]:
        """Every item of a collection, in pages (a 10,000-task list is ~15 MB at once)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            page = self.cluster.api("GET", f"{path}?limit=1000"
                                    + (f"&continue={token}" if token else ""))
            items += page["items"]
            token = page["metadata"].get("continue") or ""
            if not token:
                return items


def server_cpu(root: Path) -> dict[str, float]:
    """CPU seconds used so far by the cluster's processes (found by their temp dir)."""
    names = {"etcd": "etcd", "kube-apiserver": "apiserver",
             "kube-controller-manager": "controller-manager"}
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if not any(str(root).encode() in arg for arg in argv):
            continue
        label = names.get(Path(argv[0].decode(errors="replace")).name)
        if label is not None:
            fields = stat.rsplit(")", 1)[1].split()
            used[label] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return used


def object_size(obj: Mapping[str, Any]) -> int:
    """Bytes of an object as compact JSON: what etcd stores for a custom resource."""
    return len(json.dumps(obj, separators=(",", ":")).encode())


# --- one worker process ----------------------------------------------------------------


def worker_main(out: Path, profile: Path | None, first: int = 0, count: int = 1) -> int:
    """``run_pod_worker`` with counting: the entrypoint of each benchmark worker process.

    ``count`` workers (ordinals ``first``...) share the process, each with its own store,
    connection, watch and claim loop, as so many pods would (see --workers-per-process);
    ``out`` gets one figures object per worker."""
    from kubemr_async import logs, pod
    from kubemr_async.runtime import Worker
    from kubemr_async.state.base import WatchEvent

    stores: list[CountingStore] = []
    workers: list[Worker] = []

    class CountingStore(KubeStateStore):
        """Counts what the watch delivers; everything else is the real store."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.watch_events = 0
            stores.append(self)

        async def watch(self, job: str, since: str, *,
                        shard: int | None = None) -> AsyncIterator[WatchEvent]:
            async for event in super().watch(job, since, shard=shard):
                self.watch_events += 1
                yield event

    class CountingWorker(Worker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            workers.append(self)

    # As `kubemr worker` does: its JSON log lines (two per task) are part of the cost.
    logs.setup(os.environ.get("KUBEMR_LOG_LEVEL", "INFO"))
    pod.KubeStateStore = CountingStore  # type: ignore[attr-defined]
    pod.Worker = CountingWorker  # type: ignore[attr-defined]
    started = time.monotonic()

    async def hosted() -> int:
        envs = [{**os.environ, "KUBEMR_WORKER_ID": f"bench-w{i}",
                 "JOB_COMPLETION_INDEX": str(i)} for i in range(first, first + count)]
        codes = await asyncio.gather(*(pod.run_pod_worker(env) for env in envs))
        return max(codes)

    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        code = profiler.runcall(asyncio.run, hosted())
        profiler.dump_stats(profile)
    else:
        code = asyncio.run(hosted())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime + usage.ru_stime) / max(len(stores), 1)  # the process's, shared
    out.write_text(json.dumps([{
        **asdict(store.stats),
        "watch_events": store.watch_events,
        "tasks_done": worker.tasks_done,
        "cpu_seconds": cpu,
        "wall_seconds": time.monotonic() - started,
    } for store, worker in zip(stores, workers, strict=False)]))
    return code


# --- the bare-PATCH baseline -----------------------------------------------------------


@dataclass
class Bare:
    """What the API server sustains for guarded JSON Patch writes alone."""

    clients: int
    patches: int = 0
    seconds: float = 0.0
    server_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.patches / self.seconds if self.seconds else 0.0


def bare_patches(cluster: Any, clients: int, seconds: float) -> Bare:
    """``clients`` connections, each with one guarded PATCH (test + replace of the record's
    ``seq``, a renewal's shape) in flight at a time on its own MapReduceTask, for
    ``seconds``: the rate and the servers' CPU per PATCH."""
    namespace = f"bench-bare-{uuid.uuid4().hex[:6]}"
    cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    names = [f"bare-{i}" for i in range(clients)]
    for i, name in enumerate(names):
        cluster.api("POST", f"{GROUP_PATH}/namespaces/{namespace}/mapreducetasks", {
            "apiVersion": f"{GROUP}/v1alpha1", "kind": "MapReduceTask",
            "metadata": {"name": name},
            "status": protocol.new_task(protocol.TaskKind.MAP, i, f"in-{i}")})
    bare = Bare(clients)

    async def client(name: str, stop: float) -> int:
        done = 0
        async with await Kube.connect(str(cluster.kubeconfig_path)) as kube:
            while time.monotonic() < stop:
                await kube.patch(MAPREDUCE_TASKS, name, [
                    {"op": "test", "path": "/status/seq", "value": done},
                    {"op": "replace", "path": "/status/seq", "value": done + 1}],
                    namespace, content_type=JSON_PATCH)
                done += 1
        return done

    async def run() -> None:
        before = server_cpu(cluster.root)
        started = time.monotonic()
        counts = await asyncio.gather(*(client(n, started + seconds) for n in names))
        bare.seconds = time.monotonic() - started
        after = server_cpu(cluster.root)
        bare.server_cpu = {k: v - before.get(k, 0.0) for k, v in after.items()}
        bare.patches = sum(counts)

    asyncio.run(run())
    cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")
    return bare


# --- one job ---------------------------------------------------------------------------



@dataclass
class Run:
    """The figures of one job of N map tasks."""

    tasks: int
    workers: int
    reducers: int
    #: "direct" (our worker processes), "plain" (`kubemr worker`) or "operator".
    mode: str = "direct"
    #: ``--splits-per-task``: splits per map record (``tasks`` counts records, ``splits``
    #: the splits); 0 for the low-level job, one input per task.
    splits_per_task: int = 0
    splits: int = 0
    #: Tasks whose committed attempt was not their first (backups, takeovers).
    retried: int = 0
    #: ``--workers-per-process``: workers hosted by each worker process (direct mode).
    workers_per_process: int = 1
    plan_seconds: float = 0.0
    plan_posts: float = 0.0
    plan_patches: float = 0.0
    job_seconds: float = 0.0
    task_patches: float = 0.0
    job_patches: float = 0.0
    lost_races: float = 0.0
    lost_job_races: float = 0.0
    patch_body_bytes: float = 0.0
    #: Mean time the API server spent on a task PATCH (its own latency metric).
    patch_server_ms: float = 0.0
    create_body_bytes: float = 0.0
    watch_events_server: float = 0.0
    watch_bytes_server: float = 0.0
    job_watch_events: float = 0.0
    job_watch_bytes: float = 0.0
    max_map_bytes: int = 0
    max_reduce_bytes: int = 0
    map_status_bytes: int = 0
    probe_map_bytes: int = 0
    probe_map_status_bytes: int = 0
    job_bytes: int = 0
    per_worker: list[dict[str, Any]] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    #: Watches on MapReduceTasks open before the workers start (the controller-manager's).
    other_watchers: int = 0
    #: CPU seconds of all worker processes together.
    workers_cpu: float = 0.0
    #: CPU seconds of etcd, the API server and the controller-manager during the job.
    server_cpu: dict[str, float] = field(default_factory=dict)

    def client(self, key: str) -> float:
        return float(sum(w.get(key, 0) for w in self.per_worker))

    def worker_watch_bytes(self) -> float:
        """Bytes one worker's watch received: its events at the server's mean event size."""
        per_event = self.watch_bytes_server / max(self.watch_events_server, 1)
        return self.client("watch_events") / self.workers * per_event


def task_inputs(count: int) -> list[str]:
    # Fixed width, so a map task's record has the same size whatever N is.
    return [f"item-{i:06d}" for i in range(count)]


async def plan_job(kubeconfig: Path, namespace: str, name: str, inputs: list[str],
                   reducers: int, workers: int = 1, splits_per_task: int = 0) -> None:
    """What the operator's planning does: create job and task records (dealt into the
    shards the operator would choose for ``workers``), then start the job.

    ``splits_per_task``: the batched key/value job instead, its splits the generated
    names (planned here: they name no object to list), ``splits_per_task`` per record.
    """
    if splits_per_task:
        spec = JobSpec(name=name, job=BATCHED_MODULE, inputs=("generated-names",),
                       reducers=reducers, output=OUTPUT, splits_per_task=splits_per_task)
    else:
        spec = JobSpec(name=name, job=JOB_MODULE, inputs=tuple(inputs), reducers=reducers,
                       output=OUTPUT, split_inputs=False)
    shards = protocol.shard_count(workers)
    async with await Kube.connect(str(kubeconfig)) as kube:
        store = KubeStateStore(kube, namespace)
        splits = ([(text, None) for text in inputs] if splits_per_task
                  else await plan_inputs(spec))
        await store.create(name, [(protocol.JOB_KEY, protocol.new_job(spec, shards=shards)),
                                  *protocol.plan(spec, splits)])
        records, _ = await store.snapshot(name)
        await store.patch(name, protocol.start_job(records[protocol.JOB_KEY].job,
                                                   protocol.map_count(spec, len(splits))))


def run_job(cluster: Any, server: Server, count: int, workers: int, reducers: int,
            scratch: Path, *, mode: str, profile: Path | None, timeout: float,
            say: Callable[[str], None], splits_per_task: int = 0,
            s3_env: Mapping[str, str] | None = None, workers_per_process: int = 1) -> Run:
    records = -(-count // splits_per_task) if splits_per_task else count
    run = Run(records, workers, reducers, mode, splits_per_task, count,
              workers_per_process=min(workers_per_process, workers))
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    name = f"coord-{uuid.uuid4().hex[:6]}"  # fixed length: object sizes comparable across N
    inputs = task_inputs(count)
    if mode == "operator":
        planned, status = run_through_operator(cluster, server, run, namespace, name, inputs,
                                               scratch, timeout, say)
    else:
        planned, status = run_with_workers(cluster, server, run, namespace, name, inputs,
                                           scratch, plain=mode == "plain", profile=profile,
                                           timeout=timeout, say=say, s3_env=s3_env)
    job_metrics(run, server.metrics() - planned)
    if mode == "operator":
        # The operator deletes a Succeeded job's tasks at once: only the job is left to read.
        job = cluster.api("GET", f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs/{name}")
        run.job_bytes = object_size(job)
        merged = sorted(i for part in status["results"] for i in part.split(","))
        assert merged == inputs, "the job's results hold every input exactly once"
    else:
        check_and_measure(server, run, status, namespace, name, inputs)
    cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")
    return run


def run_with_workers(cluster: Any, server: Server, run: Run, namespace: str, name: str,
                     inputs: list[str], scratch: Path, *, plain: bool, profile: Path | None,
                     timeout: float, say: Callable[[str], None],
                     s3_env: Mapping[str, str] | None = None) -> tuple[Metrics,
                                                                       dict[str, Any]]:
    """Plan in this process, then run the workers as processes of our own (``s3_env``:
    the S3 server the batched job's workers write to)."""
    count, workers, reducers = run.tasks, run.workers, run.reducers
    cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    job_path = f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs/{name}"

    before = server.metrics()
    started = time.monotonic()
    asyncio.run(plan_job(cluster.kubeconfig_path, namespace, name, inputs, reducers, workers,
                         run.splits_per_task))
    run.plan_seconds = time.monotonic() - started
    planned = server.metrics()
    _record_planning(run, planned - before)
    batched = f" ({run.splits:,} splits)" if run.splits_per_task else ""
    say(f"  planned {count} maps{batched} + {reducers} reduces in {run.plan_seconds:.1f}s")

    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path), "KUBEMR_JOB": name,
           "KUBEMR_NAMESPACE": namespace, "PYTHONPATH": str(ROOT),
           # Never contacted (this job does no blob I/O); S3BlobStore connects lazily.
           "KUBEMR_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "unused",
           "AWS_SECRET_ACCESS_KEY": "unused", "AWS_REGION": "us-east-1", **(s3_env or {})}
    kubemr = Path(sys.executable).parent / "kubemr"
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    run.other_watchers = int(planned.total("apiserver_longrunning_requests", verb="WATCH",
                                           resource="mapreducetasks"))
    cpu_before = server_cpu(cluster.root)
    children_before = _children_cpu()
    started = time.monotonic()
    hosted = 1 if plain else run.workers_per_process
    for i in range(0, workers, hosted):
        stats, log = scratch / f"{name}-w{i}.json", scratch / f"{name}-w{i}.log"
        argv = [str(kubemr), "worker"] if plain else [
            sys.executable, str(Path(__file__).resolve()), "_worker", "--out", str(stats),
            "--first", str(i), "--count", str(min(hosted, workers - i)),
            *(["--profile", str(profile / f"{name}-n{count}-w{i}.prof")] if profile else [])]
        with log.open("wb") as out:
            # JOB_COMPLETION_INDEX: as the operator's Indexed Job gives each worker pod.
            proc = subprocess.Popen(argv, env={**env, "KUBEMR_WORKER_ID": f"bench-w{i}",
                                               "JOB_COMPLETION_INDEX": str(i)},
                                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append((proc, stats, log))
    try:
        status = _wait_decided(cluster, job_path, procs, started + timeout)
        run.job_seconds = time.monotonic() - started
        cpu_after = server_cpu(cluster.root)
        run.server_cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_after.items()}
        for proc, _, _ in procs:
            proc.wait(timeout=60)  # workers leave once they see the verdict
        # Waited-for children are exactly the workers (the cluster's processes still run).
        run.workers_cpu = _children_cpu() - children_before
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if status.get("phase") != "Succeeded":
        tail = procs[0][2].read_text(errors="replace")[-3000:]
        raise RuntimeError(f"job {name} ended {status.get('phase')}: {status}\n{tail}")
    say(f"  job Succeeded in {run.job_seconds:.1f}s")
    if not plain:
        for proc, stats, log in procs:
            if not stats.exists():  # the worker failed after the verdict: say why, go on
                say(f"  worker exited {proc.returncode} without its figures:\n"
                    f"{log.read_text(errors='replace')[-2000:]}")
        run.per_worker = [figures for _, stats, _ in procs
                          for figures in (json.loads(stats.read_text()) if stats.exists()
                                          else [{}])]
    return planned, status


def job_metrics(run: Run, delta: Metrics) -> None:
    """The API server's view of the job, from planning done to Succeeded."""
    # Every request during the job, by verb and resource (in the JSON output): who else
    # talks to the API server while the workers run (the operator, the controllers).
    for (name, labels), value in delta.samples.items():
        if name == "apiserver_request_total" and value:
            have = dict(labels)
            key = f"{have.get('verb')} {have.get('resource')}/{have.get('subresource')}"
            run.requests[key] = run.requests.get(key, 0) + int(value)
    tasks = ("mapreducetasks",)
    run.task_patches = delta.total("apiserver_request_total", group=GROUP, verb="PATCH",
                                   resource=tasks)
    run.job_patches = delta.total("apiserver_request_total", group=GROUP, verb="PATCH",
                                  resource="mapreducejobs")
    run.lost_races = delta.total("apiserver_request_total", group=GROUP, verb="PATCH",
                                 resource=tasks, code="422")
    run.lost_job_races = delta.total("apiserver_request_total", group=GROUP, verb="PATCH",
                                     resource="mapreducejobs", code="422")
    run.patch_body_bytes = _mean(delta, "mapreducetasks", "patch")
    latency = {"group": GROUP, "resource": "mapreducetasks", "verb": "PATCH"}
    run.patch_server_ms = 1000 * delta.total("apiserver_request_duration_seconds_sum",
                                             **latency) / max(
        delta.total("apiserver_request_duration_seconds_count", **latency), 1)
    run.watch_events_server = delta.total("apiserver_watch_events_total", group=GROUP,
                                          resource=tasks)
    run.watch_bytes_server = delta.total("apiserver_watch_events_sizes_sum", group=GROUP,
                                         resource=tasks)
    run.job_watch_events = delta.total("apiserver_watch_events_total", group=GROUP,
                                       resource="mapreducejobs")
    run.job_watch_bytes = delta.total("apiserver_watch_events_sizes_sum", group=GROUP,
                                      resource="mapreducejobs")


def run_through_operator(cluster: Any, server: Server, run: Run, namespace: str, name: str,
                         inputs: list[str], scratch: Path, timeout: float,
                         say: Callable[[str], None]) -> tuple[Metrics, dict[str, Any]]:
    """The product path: POST a MapReduceJob; `kubemr operator` plans it and starts a
    worker Job, whose pods the FakeKubelet runs as `kubemr worker` processes."""
    cluster.create_namespace(namespace)
    job_path = f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs/{name}"
    kubemr = Path(sys.executable).parent / "kubemr"
    log = scratch / f"{name}-operator.log"
    with log.open("wb") as out:
        operator = subprocess.Popen(
            [str(kubemr), "operator", "--kubeconfig", str(cluster.kubeconfig_path),
             "--namespace", namespace, "--worker-backoff-limit", "1",
             "--s3-endpoint", "http://127.0.0.1:9"],  # never contacted, as above
            stdout=out, stderr=subprocess.STDOUT,
            env={"PATH": str(kubemr.parent), "HOME": os.environ.get("HOME", "/")})
    try:
        manifest = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "MapReduceJob",
                    "metadata": {"name": name},
                    "spec": {"image": "kubemr-bench:dev", "job": JOB_MODULE, "inputs": inputs,
                             "splitInputs": False, "reducers": run.reducers,
                             "workers": run.workers, "output": OUTPUT}}
        before = server.metrics()
        cpu_before = server_cpu(cluster.root)
        children_before = _children_cpu()
        started = time.monotonic()
        cluster.api("POST", f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs", manifest)
        deadline = started + timeout

        def phase() -> str:
            if operator.poll() is not None:
                raise RuntimeError("the operator exited:\n"
                                   + log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {name} not decided in time")
            return job_phase(cluster, job_path)

        while phase() == "Pending":
            time.sleep(0.05)
        run.plan_seconds = time.monotonic() - started
        planned = server.metrics()
        _record_planning(run, planned - before)
        run.other_watchers = int(planned.total("apiserver_longrunning_requests", verb="WATCH",
                                               resource="mapreducetasks"))
        say(f"  the operator planned {run.tasks} maps + {run.reducers} reduces in "
            f"{run.plan_seconds:.1f}s (from the POST)")
        while phase() not in DECIDED:
            time.sleep(0.1)
        run.job_seconds = time.monotonic() - started - run.plan_seconds
        cpu_after = server_cpu(cluster.root)
        run.server_cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_after.items()}
        status: dict[str, Any] = cluster.api("GET", job_path)["status"]
        if status["phase"] != "Succeeded":
            raise RuntimeError(f"job {name} ended {status['phase']}: {status}")
        say(f"  job Succeeded {run.job_seconds:.1f}s after planning")
        # The operator's follow-up (completionTime, deleting the task namespace) is part of
        # its cost; the pods end by themselves once they see the verdict.
        while (not cluster.api("GET", job_path)["status"].get("completionTime")
               or _pods_running(cluster, namespace, name)):
            phase()  # checks the operator and the deadline
            time.sleep(0.5)
        # The worker pods are children of this process (the FakeKubelet's), reaped by now.
        run.workers_cpu = _children_cpu() - children_before
        run.server_cpu["operator"] = _process_cpu(operator.pid)
    finally:
        operator.terminate()
        operator.wait(timeout=30)
    return planned, status


def _pods_running(cluster: Any, namespace: str, job: str) -> bool:
    pods = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods"
                       f"?labelSelector=kubemr.io/job%3D{job}")["items"]
    return any((p.get("status") or {}).get("phase") in (None, "Pending", "Running")
               for p in pods)


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_and_measure(server: Server, run: Run, status: Mapping[str, Any], namespace: str,
                      name: str, inputs: list[str]) -> None:
    """Every task committed exactly once with the right result; the objects' sizes."""
    job = server.cluster.api("GET", f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs/{name}")
    run.job_bytes = object_size(job)
    task_ns = status["taskNamespace"]
    items = server.list_all(f"{GROUP_PATH}/namespaces/{task_ns}/mapreducetasks")
    maps = [t for t in items if t["status"]["kind"] == "map"]
    reduces = [t for t in items if t["status"]["kind"] == "reduce"]
    assert len(maps) == run.tasks and len(reduces) == run.reducers, (len(maps), len(reduces))
    wrong = [t["metadata"]["name"] for t in items
             if (t["status"]["state"], t["status"]["failures"]) != ("committed", 0)]
    assert not wrong, f"tasks not committed, or failed on the way: {wrong[:10]}"
    # A second attempt is a backup of a straggler (or a takeover): the output is still
    # one attempt's, which the results check below proves; say how many there were.
    run.retried = sum(1 for t in items if t["status"]["attempt"] > 1)
    if run.splits_per_task:
        # The records' splits are the inputs in order, and the committed attempts counted
        # each once (a split mapped twice, or by an attempt that did not commit, would not).
        planned = [split for t in sorted(maps, key=lambda t: t["status"]["index"])
                   for split, _ in protocol.task_splits(t["status"])]
        assert planned == inputs, "the map records hold every split once, in order"
        counted = (status.get("counters") or {}).get("bench", {}).get("splits")
        assert counted == len(inputs), f"{counted} splits counted, not {len(inputs)}"
    else:
        merged = sorted(i for part in status["results"] for i in part.split(","))
        assert merged == inputs, "the job's results hold every input exactly once"
    run.max_map_bytes = max(object_size(t) for t in maps)
    run.max_reduce_bytes = max(object_size(t) for t in reduces)
    run.map_status_bytes = max(object_size(t["status"]) for t in maps)
    # The same task at every N: sizes differ between tasks by their index's digits only.
    probe = next(t for t in maps if t["status"]["index"] == PROBE_INDEX)
    run.probe_map_bytes = object_size(probe)
    run.probe_map_status_bytes = object_size(probe["status"])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _record_planning(run: Run, delta: Metrics) -> None:
    """Planning's API writes and create sizes, from the server's metrics delta."""
    run.plan_posts = delta.total("apiserver_request_total", group=GROUP, verb="POST",
                                 resource=("mapreducetasks", "mapreducejobs"))
    run.plan_patches = delta.total("apiserver_request_total", group=GROUP, verb="PATCH",
                                   resource=("mapreducetasks", "mapreducejobs"))
    run.create_body_bytes = _mean(delta, "mapreducetasks", "create")


def _mean(delta: Metrics, resource_name: str, verb: str) -> float:
    labels = {"group": GROUP, "resource": resource_name, "verb": verb}
    count = delta.total("apiserver_request_body_size_bytes_count", **labels)
    return delta.total("apiserver_request_body_size_bytes_sum", **labels) / count if count else 0.0


def _wait_decided(cluster: Any, job_path: str,
                  procs: list[tuple[subprocess.Popen[bytes], Path, Path]],
                  deadline: float) -> dict[str, Any]:
    while True:
        phase = job_phase(cluster, job_path)
        if phase in DECIDED:
            status: dict[str, Any] = cluster.api("GET", job_path)["status"]
            return status
        if all(proc.poll() is not None for proc, _, _ in procs):
            tail = procs[0][2].read_text(errors="replace")[-3000:]
            raise RuntimeError(f"every worker exited but the job is {phase}:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job not decided in time: {phase}")
        time.sleep(0.1)


def job_phase(cluster: Any, job_path: str) -> str:
    """The job's phase, as its printer column: polling the whole object ten times a second
    would cost the API server more than some of what we measure (it holds N inputs)."""
    for _ in range(5):  # a server busy with many workers starting may not answer at once
        try:
            table = cluster.api("GET", f"{job_path}?includeObject=None",
                                accept="application/json;as=Table;v=v1;g=meta.k8s.io")
            break
        except TimeoutError:
            continue
    else:
        raise TimeoutError(f"{job_path}: the API server did not answer 5 times")
    names = [c["name"] for c in table["columnDefinitions"]]
    return str(table["rows"][0]["cells"][names.index("Phase")] or "Pending")


# --- report ----------------------------------------------------------------------------


def table(runs: list[Run], bare: Bare | None = None) -> str:
    """The figures as a Markdown table (the same one goes into benchmarks/README.md)."""
    base = runs[0]

    def apiserver_ms(r: Run) -> float:
        return 1000 * r.server_cpu.get("apiserver", 0.0) / r.tasks

    batched = any(r.splits_per_task for r in runs)
    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("workers", lambda r: f"{r.workers}" + (f" ({r.workers_per_process} per process)"
                                                 if r.workers_per_process > 1 else "")),
        ("tasks committed by a later attempt (backups, takeovers)", lambda r: f"{r.retried}"),
        *((("splits per map task (K) / splits",
            lambda r: f"{r.splits_per_task} / {r.splits:,}" if r.splits_per_task else "-"),
           ("job: splits per second",
            lambda r: f"{r.splits / r.job_seconds:.1f}" if r.splits_per_task else "-"),
           *((("job: splits/s as % of the bare PATCH/s",
               lambda r: f"{100 * r.splits / r.job_seconds / bare.rate:.0f}%"
               if r.splits_per_task else "-"),) if bare else ()),
           ("workers: task PATCHes per split",
            lambda r: f"{r.task_patches / r.splits:.4f}" if r.splits_per_task else "-"),
           ("API server CPU ms per split",
            lambda r: f"{1000 * r.server_cpu.get('apiserver', 0.0) / r.splits:.3f}"
            if r.splits_per_task else "-")) if batched else ()),
        ("job: tasks (records) per second", lambda r: f"{r.tasks / r.job_seconds:.1f}"),
        *((("job: tasks/s as % of the bare PATCH/s "
            f"({bare.rate:.0f}/s, {bare.clients} clients)",
            lambda r: f"{100 * r.tasks / r.job_seconds / bare.rate:.0f}%"),) if bare else ()),
        ("API server CPU ms per task / the first column's",
         lambda r: f"{apiserver_ms(r) / max(apiserver_ms(base), 1e-9):.2f}x"),
        ("workers: polls / full reads per worker (sharded)",
         lambda r: f"{r.client('polls') / r.workers:.1f} / {r.client('snapshots') / r.workers:.1f}"
         if r.per_worker else "n/a"),
        ("planning: seconds", lambda r: f"{r.plan_seconds:.2f}"),
        ("planning: ms per task", lambda r: f"{1000 * r.plan_seconds / r.tasks:.2f}"),
        ("planning: API writes per task",
         lambda r: f"{(r.plan_posts + r.plan_patches) / r.tasks:.3f}"),
        ("planning: bytes per task create", lambda r: f"{r.create_body_bytes:.0f}"),
        ("job: seconds, planned to Succeeded", lambda r: f"{r.job_seconds:.1f}"),
        ("job: ms per task", lambda r: f"{1000 * r.job_seconds / r.tasks:.2f}"),
        ("job: marginal ms per task (vs smallest N)",
         lambda r: "-" if r.tasks == base.tasks else
         f"{1000 * (r.job_seconds - base.job_seconds) / (r.tasks - base.tasks):.2f}"),
        ("workers: task PATCHes per task", lambda r: f"{r.task_patches / r.tasks:.3f}"),
        ("job PATCHes during the job (workers, operator)", lambda r: f"{r.job_patches:.0f}"),
        ("workers: client-counted patches per task (stats)",
         lambda r: f"{r.client('patches') / r.tasks:.3f}" if r.per_worker else "n/a"),
        ("bytes per task PATCH (server)", lambda r: f"{r.patch_body_bytes:.0f}"),
        ("server latency per task PATCH, ms", lambda r: f"{r.patch_server_ms:.1f}"),
        ("bytes per patch (client stats)",
         lambda r: f"{r.client('patch_bytes') / max(r.client('patches'), 1):.0f}"
         if r.per_worker else "n/a"),
        ("lost claim races per task (server 422s)", lambda r: f"{r.lost_races / r.tasks:.4f}"),
        ("lost races, tasks + job: server 422s / client stats",
         lambda r: f"{r.lost_races + r.lost_job_races:.0f} / "
         + (f"{r.client('lost_races'):.0f}" if r.per_worker else "n/a")),
        ("largest map task object, bytes", lambda r: f"{r.max_map_bytes or 'n/a'}"),
        ("largest map task .status, bytes", lambda r: f"{r.map_status_bytes or 'n/a'}"),
        (f"map task {PROBE_INDEX}: object / .status bytes",
         lambda r: f"{r.probe_map_bytes} / {r.probe_map_status_bytes}"
         if r.probe_map_bytes else "n/a"),
        ("largest reduce task object, bytes", lambda r: f"{r.max_reduce_bytes or 'n/a'}"),
        ("MapReduceJob object at the end, bytes", lambda r: f"{r.job_bytes}"),
        ("watch events per worker per task",
         lambda r: f"{r.client('watch_events') / r.workers / r.tasks:.2f}"
         if r.per_worker else "n/a"),
        ("watch MiB per worker (events x server bytes per event)",
         lambda r: f"{r.worker_watch_bytes() / 2**20:.1f}" if r.per_worker else "n/a"),
        ("other watchers of MapReduceTasks (controller-manager)",
         lambda r: f"{r.other_watchers}"),
        ("server: MapReduceTask watch events sent per task (all watchers)",
         lambda r: f"{r.watch_events_server / r.tasks:.2f}"),
        ("server: MapReduceTask watch bytes sent per event",
         lambda r: f"{r.watch_bytes_server / max(r.watch_events_server, 1):.0f}"),
        ("server: MapReduceJob watch events sent (all watchers)",
         lambda r: f"{r.job_watch_events:.0f}"),
        ("server: MapReduceJob watch MiB sent (all watchers)",
         lambda r: f"{r.job_watch_bytes / 2**20:.1f}"),
        ("CPU ms per task: workers (sum)", lambda r: f"{1000 * r.workers_cpu / r.tasks:.2f}"),
        *((f"CPU ms per task: {name}",
           (lambda r, name=name: f"{1000 * r.server_cpu.get(name, 0.0) / r.tasks:.2f}"))
          for name in ("apiserver", "etcd", "controller-manager", "operator")
          if any(name in r.server_cpu for r in runs)),
    ]
    lines = ["| N map tasks | " + " | ".join(f"{r.tasks:,}" for r in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(fmt(r) for r in runs) + " |" for label, fmt in rows]
    return "\n".join(lines)


# --- a tiny job's latency: `kubemr submit --wait`, from start to exit ---------------------

#: One small input (a few hundred bytes): one map, one reduce, one worker.
TINY_TEXT = b"the quick brown fox jumps over the lazy dog\n" * 8
TINY_BUCKET = "kubemr-tiny"
TINY_NAMESPACE = "tiny"
TINY_IMAGE = "kubemr-bench:dev"
#: With --warm: the operator's warm pool, one standby.
TINY_POOL_NS = "kubemr-pool"
#: The operator's namespace and its S3 Secret, as the Helm chart names them.
TINY_OPERATOR_NS = "kubemr-system"
#: Each stage of a tiny job, in order, as seconds since `kubemr submit` was started.
TINY_STAGES = (
    ("created", "the CLI printed the job's name (its start-up, connect, POST)"),
    ("planned", "the job is Running (the operator planned it: tasks, RBAC, worker Job)"),
    ("pod_created", "the worker Pod exists (the Job controller made it)"),
    ("pod_started", "the Pod is Running (the kubelet stand-in started its process), or "
                    "with --warm the standby adopted"),
    ("map_claimed", "the map is claimed (the worker imported, connected, took a snapshot)"),
    ("map_committed", "the map is committed"),
    ("reduce_claimed", "the reduce is claimed"),
    ("reduce_committed", "the reduce is committed"),
    ("decided", "the job is Succeeded (manifest, timeline, verdict written)"),
    ("seen", "the CLI printed 'succeeded'"),
    ("exited", "the CLI's process ended"),
)


@dataclass
class TinyRun:
    """One tiny job: each of TINY_STAGES' moments, in seconds since the submit started."""

    name: str = ""
    at: dict[str, float] = field(default_factory=dict)
    #: CPU seconds (user + system) of the `kubemr submit` process and of the worker Pod's
    #: process: steadier than wall times on a busy machine.
    cli_cpu: float = 0.0
    worker_cpu: float = 0.0


class _TinyWatcher:
    """Follows the namespace's jobs and Pods from a thread of its own and notes when each
    job (by name) first reached each stage; times are this machine's wall clock, like the
    workers' attempt times."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.seen: dict[str, dict[str, float]] = {}
        self._kubeconfig = kubeconfig
        self._namespace = namespace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._follows: concurrent.futures.Future[Any] | None = None

    def _note(self, job: str, stage: str) -> None:
        self.seen.setdefault(job, {}).setdefault(stage, time.time())

    async def _follow(self, resource: Any, on: Callable[[dict[str, Any]], None],
                      every_namespace: bool = False) -> None:
        """``every_namespace``: the warm pool's standbys run in a namespace of their own."""
        from kubemr_async.kube import Changed, list_watch

        async with await Kube.connect(str(self._kubeconfig)) as kube:
            async for event in list_watch(kube, resource,
                                          None if every_namespace else self._namespace,
                                          context=f"tiny-job watch of {resource.plural}"):
                if isinstance(event, Changed) and event.type != "DELETED":
                    on(event.object)

    def _on_job(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Running", "Succeeded"):
            self._note(name, "planned")
        if phase == "Succeeded":
            self._note(name, "decided")

    def _on_pod(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        adopted = (meta.get("annotations") or {}).get(ADOPTED_ANNOTATION, "")
        job = (meta.get("labels") or {}).get("kubemr.io/job") or adopted.partition("/")[2]
        if job:
            self._note(job, "pod_created")
            phase = (obj.get("status") or {}).get("phase")
            if phase in ("Running", "Succeeded", "Failed"):
                self._note(job, "pod_started")
            if phase in ("Succeeded", "Failed"):
                self._note(job, "pod_ended")  # reported once the process was reaped

    def __enter__(self) -> _TinyWatcher:
        from kubemr_async.crd import MAPREDUCE_JOBS
        from kubemr_async.kube import PODS

        async def follow_both() -> None:
            await asyncio.gather(self._follow(MAPREDUCE_JOBS, self._on_job),
                                 self._follow(PODS, self._on_pod, every_namespace=True))

        self._thread.start()
        self._follows = asyncio.run_coroutine_threadsafe(follow_both(), self._loop)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._follows is not None
        self._follows.cancel()
        concurrent.futures.wait([self._follows], timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def _tiny_cluster_setup(cluster: Any, s3_server: Any, scratch: Path,
                        warm: bool) -> subprocess.Popen[bytes]:
    """The namespaces, the operator's S3 Secret, the input, and `kubemr operator` (as the
    Helm chart runs it, at INFO) watching the tiny jobs' namespace; ``warm``: with one
    standby worker in its warm pool."""
    import boto3

    cluster.create_namespace(TINY_NAMESPACE)
    cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": TINY_OPERATOR_NS}})
    cluster.api("POST", f"/api/v1/namespaces/{TINY_OPERATOR_NS}/secrets",
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubemr-s3"},
                 "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                                "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url,
                      aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key, region_name=s3_server.region)
    s3.create_bucket(Bucket=TINY_BUCKET)
    s3.put_object(Bucket=TINY_BUCKET, Key="in/tiny.txt", Body=TINY_TEXT)
    kubemr = Path(sys.executable).parent / "kubemr"
    with (scratch / "tiny-operator.log").open("wb") as out:
        return subprocess.Popen(
            [str(kubemr), "operator", "--kubeconfig", str(cluster.kubeconfig_path),
             "--operator-namespace", TINY_OPERATOR_NS, "--s3-secret", "kubemr-s3",
             "--s3-endpoint", s3_server.endpoint_url, "--namespace", TINY_NAMESPACE,
             "--platform-credentials-namespaces",
             f"kubernetes.io/metadata.name={TINY_NAMESPACE}",
             *(["--warm-workers", "1", "--warm-image", TINY_IMAGE,
                "--pool-namespace", TINY_POOL_NS] if warm else [])],
            stdout=out, stderr=subprocess.STDOUT,
            env={"PATH": str(kubemr.parent), "PYTHONPATH": _pythonpath(),
                 "HOME": os.environ.get("HOME", "/"), "KUBEMR_LOG_LEVEL": "INFO",
                 "KUBEMR_S3_ENDPOINT": s3_server.endpoint_url,
                 "AWS_ACCESS_KEY_ID": s3_server.access_key,
                 "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                 "AWS_REGION": s3_server.region})


def _tiny_submit(cluster: Any, s3_server: Any, watcher: _TinyWatcher,
                 timeout: float) -> TinyRun:
    """One `kubemr submit --wait` of the wordcount example on the tiny input, timed from
    the moment its process is started; the attempts' times come from the _timeline.json
    the deciding worker leaves beside the results."""
    import boto3

    kubemr = Path(sys.executable).parent / "kubemr"
    env = {**os.environ, "PYTHONPATH": _pythonpath(), **s3_server.client_env()}
    env.pop("KUBECONFIG", None)
    argv = [str(kubemr), "submit", "--image", TINY_IMAGE, "--job",
            "examples.wordcount", "--input", f"s3://{TINY_BUCKET}/in/tiny.txt",
            "--output", f"s3://{TINY_BUCKET}/out", "--generate-name", "tiny-",
            "--workers", "1", "--reducers", "1", "--wait", "-n", TINY_NAMESPACE,
            "--kubeconfig", str(cluster.kubeconfig_path)]
    run = TinyRun()
    children_before = _children_cpu()
    started = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    run.name = proc.stdout.readline().decode().strip()
    run.at["created"] = time.time() - started
    errors = []
    for line in proc.stderr:  # until it exits
        errors.append(line.decode(errors="replace"))
        if b"succeeded" in line:
            run.at["seen"] = time.time() - started
    _, status, usage = os.wait4(proc.pid, 0)
    run.at["exited"] = time.time() - started
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    run.cli_cpu = usage.ru_utime + usage.ru_stime
    if code != 0 or not run.name:
        raise RuntimeError(f"kubemr submit exited {code}: {''.join(errors)[-2000:]}")
    deadline = time.monotonic() + timeout
    while "pod_ended" not in watcher.seen.get(run.name, {}) and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker leaves once it sees the verdict
    run.worker_cpu = _children_cpu() - children_before - run.cli_cpu
    for stage, when in watcher.seen.get(run.name, {}).items():
        run.at[stage] = when - started
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url,
                      aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key, region_name=s3_server.region)
    key = f"out/{TINY_NAMESPACE}/{run.name}/_timeline.json"
    kept = json.loads(s3.get_object(Bucket=TINY_BUCKET, Key=key)["Body"].read())
    for task in kept:
        first, last = task["history"][0], task["history"][-1]
        kind = "map" if task["kind"] == "map" else "reduce"
        run.at[f"{kind}_claimed"] = first["start"] / 1000 - started
        run.at[f"{kind}_committed"] = last["end"] / 1000 - started
    return run


def tiny_job_latency(repeats: int = 5, timeout: float = 120.0,
                     say: Callable[[str], None] = print, warm: bool = False) -> list[TinyRun]:
    """The tiny job (one small input, 1 reducer, 1 worker) submitted `repeats` times with
    `kubemr submit --wait` on the test cluster, the whole product path: the CLI, `kubemr
    operator`, the controller-manager's Job controller, the kubelet stand-in's Pod process
    (`kubemr worker`), the S3 server. One job first warms the caches and is not counted.
    ``warm``: the operator keeps one standby worker, which each job adopts; each submit
    waits for a fresh standby to be ready first."""
    from kubemr_async.testing.cluster import TestCluster
    from kubemr_async.testing.kubelet import FakeKubelet
    from kubemr_async.testing.s3server import S3Server

    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(TestCluster())
        s3_server = stack.enter_context(S3Server())
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kubemr-tiny-")))

        async def install() -> None:
            async with await Kube.connect(str(cluster.kubeconfig_path)) as kube:
                await ensure_crds(kube)

        asyncio.run(install())
        cluster.wait_until_listed([f"{GROUP_PATH}/{plural}"
                                   for plural in ("mapreducejobs", "mapreducetasks")])
        operator = _tiny_cluster_setup(cluster, s3_server, scratch, warm)
        stack.callback(operator.wait, 30)
        stack.callback(operator.terminate)
        stack.enter_context(FakeKubelet(cluster.kubeconfig_path, log_dir=scratch / "pods",
                                        extra_env={"PYTHONPATH": _pythonpath()}))
        watcher = stack.enter_context(_TinyWatcher(cluster.kubeconfig_path, TINY_NAMESPACE))
        runs = []
        for i in range(repeats + 1):
            if warm:
                _wait_for_standby(scratch / "pods" / TINY_POOL_NS, i + 1, timeout)
            run = _tiny_submit(cluster, s3_server, watcher, timeout)
            say(f"  {'warm-up' if i == 0 else f'run {i}'}: {run.name} "
                f"{run.at['exited']:.2f}s, load average {os.getloadavg()[0]:.1f}")
            if i:
                runs.append(run)
        return runs


def _wait_for_standby(logs: Path, count: int, timeout: float) -> None:
    """Until ``count`` standbys have said they are waiting (each does once, and serves
    one job): the one the next job adopts is ready."""
    deadline = time.monotonic() + timeout
    while sum("standby waiting" in path.read_text(errors="replace")
              for path in logs.glob("*.log")) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no standby ready in {timeout:.0f}s (logs in {logs})")
        time.sleep(0.05)
    time.sleep(0.5)  # the machine settles after the standby's start, as a cold run's does


def _pythonpath() -> str:
    """This checkout first (the CLI, the operator and the Pods run its code, not whatever
    the venv's editable install points at), then the caller's own PYTHONPATH."""
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def tiny_table(runs: list[TinyRun]) -> str:
    """Each stage's median moment and the median step from the stage before it."""
    lines = [f"tiny job, median of {len(runs)} (seconds since `kubemr submit --wait` started)",
             f"{'stage':<18}{'at':>7}{'step':>7}  what"]
    previous = 0.0
    for stage, what in TINY_STAGES:
        moments = [r.at[stage] for r in runs if stage in r.at]
        if not moments:
            continue
        at = statistics.median(moments)
        lines.append(f"{stage:<18}{at:7.3f}{at - previous:7.3f}  {what}")
        previous = at
    totals = ", ".join(f"{r.at['exited']:.2f}" for r in runs)
    lines.append(f"submit to exit, each run: {totals}")
    lines.append(f"CPU seconds, median: the CLI {statistics.median(r.cli_cpu for r in runs):.3f}"
                 f", the worker {statistics.median(r.worker_cpu for r in runs):.3f}")
    return "\n".join(lines)


def _bench_bucket(stack: contextlib.ExitStack) -> dict[str, str]:
    """An S3 server with OUTPUT's bucket, for the batched job's reduce part and manifest;
    the workers' environment to reach it."""
    import boto3

    from kubemr_async.testing.s3server import S3Server

    s3_server = stack.enter_context(S3Server())
    boto3.client("s3", endpoint_url=s3_server.endpoint_url,
                 aws_access_key_id=s3_server.access_key,
                 aws_secret_access_key=s3_server.secret_key,
                 region_name=s3_server.region).create_bucket(
        Bucket=OUTPUT.removeprefix("s3://").split("/", 1)[0])
    return {"KUBEMR_S3_ENDPOINT": s3_server.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_REGION": s3_server.region}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:  # one worker process (internal; see worker_main)
        child = argparse.ArgumentParser(prog="coordination.py _worker")
        child.add_argument("--out", type=Path, required=True)
        child.add_argument("--profile", type=Path)
        child.add_argument("--first", type=int, default=0)
        child.add_argument("--count", type=int, default=1)
        options = child.parse_args(argv[1:])
        return worker_main(options.out, options.profile, options.first, options.count)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", default="10,1000,10000",
                        help="comma-separated map task counts (default 10,1000,10000)")
    parser.add_argument("--workers", default="4",
                        help="comma-separated worker counts: each N runs with each (a sweep)")
    parser.add_argument("--bare", action="store_true",
                        help="first measure the bare guarded-PATCH rate (4 clients, 20 s)")
    parser.add_argument("--workers-per-process", type=int, metavar="P", default=1,
                        help="direct mode: P workers share each process (each its own "
                             "store, connection, watch and claims, as P pods would), so "
                             "that 64 workers on a small machine do not pay 64 interpreters' "
                             "start-up (~0.9 s of CPU each) inside the job's time")
    parser.add_argument("--reducers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per job")
    parser.add_argument(
        "--mode", choices=("direct", "plain", "operator"), default="direct",
        help="direct: plan here, run counting workers (default); plain: the same with the "
             "`kubemr worker` script (no per-worker counts); operator: POST the job to a "
             "`kubemr operator` process, worker pods run by the FakeKubelet (tasks are "
             "deleted on success, so no per-task checks or sizes)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of each worker here")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--splits-per-task", type=int, metavar="K", default=0,
                        help="the batched key/value job instead: each N is a number of "
                             "splits, K per map record (1: the same job unbatched); starts "
                             "an S3 server too (direct or plain mode)")
    parser.add_argument("--tiny-job", type=int, metavar="N", default=0,
                        help="instead: a tiny job's `kubemr submit --wait`, N times (median, "
                             "with each stage's moment)")
    parser.add_argument("--warm", action="store_true",
                        help="with --tiny-job: the operator keeps a standby worker (its warm "
                             "pool) that each job adopts")
    args = parser.parse_args(argv)
    if args.splits_per_task and args.mode == "operator":
        parser.error("--splits-per-task runs in direct or plain mode (the operator would "
                     "list the generated names as objects)")
    if not 0 <= args.splits_per_task <= MAX_SPLITS_PER_TASK:
        parser.error(f"--splits-per-task must be between 1 and {MAX_SPLITS_PER_TASK}")
    if args.tiny_job:
        print(tiny_table(tiny_job_latency(args.tiny_job, say=lambda text: print(
            text, file=sys.stderr, flush=True), warm=args.warm)))
        return 0

    from kubemr_async.testing.cluster import TestCluster

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    counts = [int(n) for n in args.tasks.split(",")]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(TestCluster())
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kubemr-coord-"))
        async def install() -> None:
            async with await Kube.connect(str(cluster.kubeconfig_path)) as kube:
                await ensure_crds(kube)

        asyncio.run(install())
        s3_env = _bench_bucket(stack) if args.splits_per_task else None
        # The first custom resources after a CRD is installed cost the API server ~2 s of
        # one-time set-up; plan one throwaway job so that no figure includes it.
        cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": "bench-warmup"}})
        asyncio.run(plan_job(cluster.kubeconfig_path, "bench-warmup", "warmup", ["x"], 1))
        server = Server(cluster)
        if args.mode == "operator":
            from kubemr_async.testing.kubelet import FakeKubelet

            stack.enter_context(FakeKubelet(cluster.kubeconfig_path, log_dir=Path(tmp) / "pods",
                                            extra_env={"PYTHONPATH": str(ROOT)}))
        # The controller-manager (garbage collector, quota) follows every resource type
        # with one cluster-wide watch, set up some 30 s after a CRD appears. A real cluster
        # always has it, so every N is measured with it in place.
        deadline = time.monotonic() + 120
        while server.metrics().total("apiserver_longrunning_requests", verb="WATCH",
                                     resource="mapreducetasks") < 1:
            if time.monotonic() > deadline:
                say("warning: the controller-manager never watched MapReduceTasks")
                break
            time.sleep(1.0)
        bare = None
        if args.bare:
            bare = bare_patches(cluster, clients=4, seconds=20.0)
            cpu = 1000 * bare.server_cpu.get("apiserver", 0.0) / max(bare.patches, 1)
            say(f"bare PATCH: {bare.rate:.0f}/s with {bare.clients} clients; API server "
                f"{cpu:.2f} ms CPU per PATCH")
        for count in counts:
            for workers in (int(w) for w in args.workers.split(",")):
                say(f"N={count}: {workers} workers, {args.reducers} reducer(s); load average "
                    f"{os.getloadavg()[0]:.1f}")
                runs.append(run_job(cluster, server, count, workers, args.reducers, Path(tmp),
                                    mode=args.mode, profile=args.profile,
                                    timeout=args.timeout, say=say,
                                    splits_per_task=args.splits_per_task, s3_env=s3_env,
                                    workers_per_process=args.workers_per_process))
                say(table([runs[-1]], bare))  # each point as it comes: a long sweep may die
    print(table(runs, bare))
    if bare is not None:
        print(f"\nbare PATCH: {bare.patches} in {bare.seconds:.1f}s = {bare.rate:.0f}/s; "
              f"API server {1000 * bare.server_cpu.get('apiserver', 0.0) / bare.patches:.2f} "
              "ms CPU per PATCH")
    # Other processes' load skews absolute times on a small shared machine: say how busy.
    print(f"\nload average at the end (1/5/15 min): "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"bare": asdict(bare) if bare else None,
                                         "runs": [asdict(r) for r in runs]}, indent=2))
    limit_ok = all(max(r.max_map_bytes, r.max_reduce_bytes, r.job_bytes) < ETCD_LIMIT / 4
                   for r in runs)
    # Per worker count: a longer worker id ("bench-w63") is a longer record, not growth.
    flat = args.mode == "operator" or all(
        len({r.probe_map_status_bytes for r in runs if r.workers == w}) == 1
        for w in {r.workers for r in runs})
    print(f"\nobjects far below etcd's 1.5 MiB: {limit_ok}; map task record size flat in N: "
          f"{flat}")
    return 0 if limit_ok and flat else 1


if __name__ == "__main__":
    sys.exit(main())
