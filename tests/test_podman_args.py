"""Container mode's translation of a Pod into ``podman create`` flags (fast; the real
containers are tests/test_containers.py)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.testing.podman import (
    SERVICE_ACCOUNT_DIR,
    ContainerConfigError,
    quantity,
    run_argv,
)


def pod(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [container], **spec}}


def test_quantities() -> None:
    assert quantity("512Mi") == 512 << 20 and quantity("1G") == 10**9
    assert quantity("500m") == Decimal("0.5") and quantity(2) == 2
    with pytest.raises(ContainerConfigError, match="bad resource quantity '1Qi'"):
        quantity("1Qi")


def test_a_pod_becomes_podman_flags(tmp_path: Path) -> None:
    container = {
        "name": "c", "image": "img:1", "command": ["kubemr"], "args": ["worker"],
        "securityContext": {"runAsUser": 10001, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "resources": {"limits": {"memory": "64Mi", "cpu": "250m"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "api", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}]}
    spec = pod(container, securityContext={"runAsGroup": 10001},
               volumes=[{"name": "tmp", "emptyDir": {}},
                        {"name": "api", "projected": {"sources": [
                            {"serviceAccountToken": {"path": "token"}}]}}])
    argv = run_argv(spec, container, {"SECRET": "x"}, name="n", command=["kubemr"],
                    args=["worker"], volumes_dir=tmp_path / "v", service_account_dir=tmp_path)
    assert argv[:2] == ["create", "--name"]
    assert argv[-2:] == ["img:1", "worker"] and argv[argv.index("--entrypoint") + 1] == '["kubemr"]'
    for flags in (["--user", "10001:10001"], ["--read-only", "--read-only-tmpfs=false"],
                  ["--security-opt", "no-new-privileges"], ["-e", "SECRET"]):
        i = argv.index(flags[0])
        assert argv[i:i + len(flags)] == flags
    assert {"--cap-drop=all", f"--memory={64 << 20}", f"--memory-swap={64 << 20}",
            "--cpus=0.250", "--network=host"} <= set(argv)
    assert "x" not in argv, "values stay out of the command line"
    mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "--mount"]
    assert mounts == [f"type=bind,source={tmp_path / 'v' / 'tmp'},destination=/tmp",
                      f"type=bind,source={tmp_path},destination={SERVICE_ACCOUNT_DIR},ro"]
    assert (tmp_path / "v" / "tmp").stat().st_mode & 0o777 == 0o777


def test_the_token_is_mounted_without_a_volume_unless_opted_out(tmp_path: Path) -> None:
    container = {"name": "c", "image": "i"}
    argv = run_argv(pod(container), container, {}, name="n", command=[], args=[],
                    volumes_dir=tmp_path, service_account_dir=tmp_path)
    assert f"type=bind,source={tmp_path},destination={SERVICE_ACCOUNT_DIR},ro" in argv
    assert "--entrypoint" not in argv and argv[-1] == "i", "the image's ENTRYPOINT and CMD"
    argv = run_argv(pod(container, automountServiceAccountToken=False), container, {},
                    name="n", command=[], args=[], volumes_dir=tmp_path,
                    service_account_dir=tmp_path)
    assert "--mount" not in argv


def test_unsupported_volumes_are_refused(tmp_path: Path) -> None:
    container = {"name": "c", "image": "i", "volumeMounts": [{"name": "h", "mountPath": "/h"}]}
    spec = pod(container, volumes=[{"name": "h", "hostPath": {"path": "/"}}])
    with pytest.raises(ContainerConfigError, match="volume 'h': only emptyDir"):
        run_argv(spec, container, {}, name="n", command=[], args=[], volumes_dir=tmp_path,
                 service_account_dir=tmp_path)
