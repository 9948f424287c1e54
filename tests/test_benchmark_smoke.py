"""Smoke test for the word-count benchmark: corpus properties and peer agreement.

No timing assertions: this only guards the benchmark's *correctness* machinery (the
corpus really exercises raw bytes and all whitespace kinds; peers agree).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import corpus, straggler, streaming, wordcount  # noqa: E402

SIZE = 1 << 20
FILES = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> corpus.Corpus:
    return corpus.ensure_corpus(tmp_path_factory.mktemp("bench"), SIZE, FILES, seed=7)


def _read_all(c: corpus.Corpus) -> bytes:
    return b"".join(p.read_bytes() for p in c.paths)


def test_requested_size_and_layout(tiny: corpus.Corpus) -> None:
    assert tiny.generated
    assert len(tiny.paths) == FILES
    assert sum(p.stat().st_size for p in tiny.paths) == SIZE
    assert [p.stat().st_size for p in tiny.paths] == [SIZE // FILES] * FILES
    # Only data files in the input directory: it is passed as-is to `kubemr run --input`.
    assert sorted(tiny.directory.iterdir()) == sorted(tiny.paths)


def test_deterministic_and_cached(tiny: corpus.Corpus, tmp_path: Path) -> None:
    again = corpus.ensure_corpus(tmp_path, SIZE, FILES, seed=7)
    assert again.generated
    assert _read_all(again) == _read_all(tiny)
    # Second call with the same parameters reuses the files.
    cached = corpus.ensure_corpus(tmp_path, SIZE, FILES, seed=7)
    assert not cached.generated
    other = corpus.ensure_corpus(tmp_path, SIZE, FILES, seed=8)
    assert _read_all(other) != _read_all(tiny)


def test_cache_invalidated_by_wrong_size(tmp_path: Path) -> None:
    c = corpus.ensure_corpus(tmp_path, 4096, 2, seed=1)
    original = c.paths[0].read_bytes()
    c.paths[0].write_bytes(original[:-1])
    again = corpus.ensure_corpus(tmp_path, 4096, 2, seed=1)
    assert again.generated
    assert again.paths[0].read_bytes() == original


def test_content_exercises_bytes_case_and_whitespace(tiny: corpus.Corpus) -> None:
    data = _read_all(tiny)
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    assert b"\xe9" in data
    # Bytes str.split() would split on (after a latin-1 decode) but bytes.split() won't.
    assert any(b in data for b in (b"\x1c", b"\x1f", b"\x85", b"\xa0"))
    for sep in (b" ", b"\n", b"\t", b"\r\n", b"  ", b"\x0b", b"\x0c"):
        assert sep in data, sep
    words = set(data.split())
    lower = {w for w in words if w.isalpha() and w.islower()}
    assert any(w.capitalize() in words for w in lower)
    assert any(w.upper() in words for w in lower if len(w) > 1)
    assert len(words) > 10_000


def test_counter_and_mp_pool_agree(tiny: corpus.Corpus) -> None:
    paths = [str(p) for p in tiny.paths]
    ref = wordcount.peer_counter(paths, 1)
    assert sum(ref.values()) == len(_read_all(tiny).split())
    assert wordcount.peer_mp_pool(paths, 2) == ref


def test_kubemr_output_parser(tmp_path: Path) -> None:
    (tmp_path / "part-00000").write_bytes(b"caf\xe9\t3\nThe\t1\n")
    (tmp_path / "part-00001").write_bytes(b"the\t2\n")
    (tmp_path / "_SUCCESS").write_text("{}")
    assert wordcount.parse_kubemr_output(tmp_path) == {b"caf\xe9": 3, b"The": 1, b"the": 2}
    (tmp_path / "part-00002").write_bytes(b"the\t5\n")
    with pytest.raises(wordcount.PeerError, match="duplicate"):
        wordcount.parse_kubemr_output(tmp_path)


def test_table_reports_failures() -> None:
    results = [
        wordcount.Result("counter", seconds=2.0, runs=[2.0]),
        wordcount.Result("kubemr", seconds=1.0, runs=[1.0], correct=False, error="x"),
    ]
    table = wordcount.format_table(results, 10**6)
    assert "2.00x" in table
    assert "FAIL" in table


def _fake_kubemr(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "fake-kubemr"
    exe.write_text(f"#!{sys.executable}\nimport sys\nfrom pathlib import Path\n{body}")
    exe.chmod(0o755)
    return str(exe)


def test_kubemr_peer_success_and_failure(tiny: corpus.Corpus, tmp_path: Path) -> None:
    # A stand-in CLI honouring the output contract: part files plus _SUCCESS.
    ok = _fake_kubemr(
        tmp_path,
        "from collections import Counter\n"
        "a = sys.argv\n"
        "inp, out = Path(a[a.index('--input') + 1]), Path(a[a.index('--output') + 1])\n"
        "c = Counter(w for p in sorted(inp.iterdir()) for w in p.read_bytes().split())\n"
        "out.mkdir(parents=True)\n"
        "for i in range(2):\n"
        "    lines = [w + b'\\t' + str(n).encode() + b'\\n' for w, n in sorted(c.items())"
        " if hash(w) % 2 == i]\n"
        "    (out / f'part-{i:05d}').write_bytes(b''.join(lines))\n"
        "(out / '_SUCCESS').write_text('{}')\n",
    )
    opts = wordcount.KubemrOptions(executable=ok, workers=2, work_dir=tmp_path)
    _, counts = wordcount.run_kubemr(opts, tiny.directory)
    assert counts == wordcount.peer_counter([str(p) for p in tiny.paths], 1)

    bad = _fake_kubemr(tmp_path, "sys.stderr.write('boom: no such job\\n')\nsys.exit(3)\n")
    opts = wordcount.KubemrOptions(executable=bad, workers=2, work_dir=tmp_path)
    with pytest.raises(wordcount.PeerError, match=r"exited 3[\s\S]*boom: no such job"):
        wordcount.run_kubemr(opts, tiny.directory)


def test_kubemr_in_every_format_matches_the_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The real CLI on a small corpus: text, jsonl and parquet results all equal Counter's.
    status = wordcount.main(["--size-mib", "0.25", "--files", "2", "--only", "kubemr",
                             "--formats", "text,jsonl,parquet", "--data-dir", str(tmp_path),
                             "--no-speculative-row"])
    out = capsys.readouterr().out
    assert status == 0, out
    for row in ("kubemr ", "kubemr-jsonl", "kubemr-parquet", "kubemr-nospec"):
        assert row in out
    assert "FAIL" not in out and "ERROR" not in out


def test_streaming_peers_all_match_the_reference_and_report_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The real CLI (shell steps and Python) and the bare pipeline, on a small corpus.
    status = streaming.main(["--size-mib", "0.25", "--files", "2", "--workers", "1",
                             "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in streaming.PEERS}
    assert sorted(rows) == sorted(streaming.PEERS)
    for row in rows.values():
        assert row[-1] == "yes", out
    for peer in ("kubemr-streaming", "kubemr-python"):  # interpreters: ~1 s CPU at least
        assert float(rows[peer][3]) > 0, f"{peer} reports no CPU seconds: {out}"
    assert rows["kubemr-streaming"][-3:-1] == ["1.00x", "1.00x"]


def test_results_reader_rejects_a_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "part-00000.jsonl").write_bytes(b'["a", 1]\n')
    with pytest.raises(wordcount.PeerError, match="no _SUCCESS manifest"):
        wordcount.read_kubemr_results(tmp_path)


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_the_straggler_duty_cycle_stops_the_first_marked_worker_and_resumes_it(
        tmp_path: Path) -> None:
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        (tmp_path / str(proc.pid)).touch()
        with straggler.DutyCycle(tmp_path, duty=0.2, period=0.5) as slowed:
            states = set()
            deadline = time.monotonic() + 30
            while "T" not in states and time.monotonic() < deadline:
                states.add(_state(proc.pid))
                time.sleep(0.01)
        assert slowed.pid == proc.pid
        assert "T" in states, f"never seen stopped: {states}"
        assert _state(proc.pid) != "T", "left stopped"
    finally:
        proc.kill()
        proc.wait()


def test_the_straggler_reference_is_what_the_jobs_map_emits(tmp_path: Path) -> None:
    # The benchmark checks every run's result against burn(): the job's map must agree.
    from types import SimpleNamespace

    namespace: dict[str, object] = {}
    exec(straggler.JOB, namespace)
    emit = namespace["burn"]
    assert callable(emit)
    ctx = SimpleNamespace(args={"pids": str(tmp_path)})
    assert list(emit("11 50", ctx)) == [(11 % 8, straggler.burn(11, 50))]
    assert [p.name for p in tmp_path.iterdir()] == [str(os.getpid())]
