"""The API client's own cost on the hot path: CPU per guarded PATCH, and import time.

A worker's claims, renewals and commits are JSON Patch writes with a ``test`` op; what it
spends per write besides the API server's answer is client CPU (building the request,
TLS, parsing the reply). This runs three clients in one process, against one real
kube-apiserver on loopback, writing the same guarded patch N times each (alternating
rounds, so load on the machine falls on all of them alike):

* ``kubemr``: :class:`kubemr_async.kube.Kube` (aiohttp + orjson, our kubeconfig reader);
* ``generated``: kubernetes_asyncio's ``ApiClient.call_api`` with a kubeconfig it loaded
  itself (what ``Kube`` sat on before);
* ``bare``: one aiohttp session and ``orjson``, nothing else: the floor.

It also times, in fresh interpreters (best of 5), importing what a worker imports before
its first claim, and importing kubernetes_asyncio alone.

    .venv/bin/python benchmarks/kube_client.py             # 2,000 patches per client
    .venv/bin/python benchmarks/kube_client.py --patches 500 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from kubemr_async.kube import CONFIG_MAPS, JSON_PATCH, NAMESPACES, Kube
from kubemr_async.testing.cluster import TestCluster

Patch = Callable[[int], Awaitable[None]]
WORKER_IMPORTS = ("import kubemr_async.pod, kubemr_async.runtime, kubemr_async.state.kube, "
                  "kubemr_async.storage.s3")


def _ops(seq: int) -> list[dict[str, Any]]:
    return [{"op": "test", "path": "/data/seq", "value": str(seq)},
            {"op": "replace", "path": "/data/seq", "value": str(seq + 1)}]


async def _kubemr(kubeconfig: Path, namespace: str, name: str) -> tuple[Patch, Any]:
    kube = await Kube.connect(str(kubeconfig))

    async def patch(seq: int) -> None:
        await kube.patch(CONFIG_MAPS, name, _ops(seq), namespace, content_type=JSON_PATCH)
    return patch, kube.aclose


async def _generated(kubeconfig: Path, namespace: str, name: str) -> tuple[Patch, Any]:
    from kubernetes_asyncio.client import ApiClient, Configuration
    from kubernetes_asyncio.config import load_kube_config

    config = Configuration()
    await load_kube_config(config_file=str(kubeconfig), client_configuration=config,
                           persist_config=False)
    api = ApiClient(configuration=config)
    path = CONFIG_MAPS.path(namespace, name)

    async def patch(seq: int) -> None:
        resp = await api.call_api(
            path, "PATCH", header_params={"Accept": "application/json",
                                          "Content-Type": JSON_PATCH},
            body=_ops(seq), auth_settings=["BearerToken"], _preload_content=False)
        orjson.loads(await resp.read())
        resp.release()
    return patch, api.close


async def _bare(kubeconfig: Path, namespace: str, name: str) -> tuple[Patch, Any]:
    doc = yaml.safe_load(await asyncio.to_thread(kubeconfig.read_text))
    cluster = doc["clusters"][0]["cluster"]
    token = doc["users"][0]["user"]["token"]
    tls = ssl.create_default_context(
        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls))
    url = cluster["server"] + CONFIG_MAPS.path(namespace, name)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": JSON_PATCH,
               "Accept": "application/json"}

    async def patch(seq: int) -> None:
        async with session.patch(url, data=orjson.dumps(_ops(seq)), headers=headers) as resp:
            resp.raise_for_status()
            orjson.loads(await resp.read())
    return patch, session.close


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(kubeconfig: Path, patches: int, rounds: int) -> dict[str, dict[str, float]]:
    makers = {"kubemr": _kubemr, "generated": _generated, "bare": _bare}
    async with await Kube.connect(str(kubeconfig)) as admin:
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        await admin.create(NAMESPACES, {"metadata": {"name": namespace}})
        clients = {}
        for label, make in makers.items():
            await admin.create(CONFIG_MAPS, {"metadata": {"name": label},
                                             "data": {"seq": "0"}}, namespace)
            clients[label] = await make(kubeconfig, namespace, label)
        totals = {label: {"cpu": 0.0, "wall": 0.0, "patches": 0.0} for label in makers}
        seqs = dict.fromkeys(makers, 0)
        try:
            for label, (patch, _) in clients.items():  # warm: connections, TLS sessions
                for _ in range(20):
                    await patch(seqs[label])
                    seqs[label] += 1
            per_round = max(1, patches // rounds)
            for _ in range(rounds):
                for label, (patch, _) in clients.items():
                    cpu, wall = _cpu(), time.perf_counter()
                    for _ in range(per_round):
                        await patch(seqs[label])
                        seqs[label] += 1
                    totals[label]["cpu"] += _cpu() - cpu
                    totals[label]["wall"] += time.perf_counter() - wall
                    totals[label]["patches"] += per_round
        finally:
            for _, close in clients.values():
                await close()
            await admin.delete(NAMESPACES, namespace)
    return {label: {"cpu_ms_per_patch": 1000 * t["cpu"] / t["patches"],
                    "wall_ms_per_patch": 1000 * t["wall"] / t["patches"],
                    "patches": t["patches"]} for label, t in totals.items()}


def import_seconds(code: str, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=2000, help="patches per client")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with TestCluster().start() as cluster:
        figures: dict[str, Any] = asyncio.run(
            measure(cluster.kubeconfig_path, args.patches, args.rounds))
    imports = {"python alone": import_seconds("pass"),
               "worker imports": import_seconds(WORKER_IMPORTS),
               "kubernetes_asyncio alone": import_seconds("import kubernetes_asyncio")}
    floor = figures["bare"]["cpu_ms_per_patch"]
    print(f"{'client':<10} {'CPU ms/patch':>13} {'x bare':>7} {'wall ms/patch':>14}")
    for label, row in figures.items():
        print(f"{label:<10} {row['cpu_ms_per_patch']:>13.3f} "
              f"{row['cpu_ms_per_patch'] / floor:>7.2f} {row['wall_ms_per_patch']:>14.3f}")
    for label, seconds in imports.items():
        print(f"import: {label:<26} {seconds:6.3f} s")
    print(f"peak RSS of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"patches": figures, "imports": imports},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
