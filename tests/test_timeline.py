"""The job timeline: the pure page builder, and a real job's page drawn by a real browser.

The builder is tested as a function (records in, HTML out). The end-to-end test runs a
real `kubemr run --timeline` (worker processes, SQLite store) on a job with a straggler
and a failing attempt, opens the page in headless Chromium (Debian's package, installed by
hack/ensure-chromium.sh) and counts what it drew on the screenshot: one bar of the outcome's
colour per attempt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kubemr_async import protocol, timeline
from kubemr_async.records import Attempt, TaskRecord

ROOT = Path(__file__).resolve().parents[1]
KUBEMR = str(Path(sys.executable).parent / "kubemr")
NOW = 1_800_000_000_000  # Unix ms


def task(kind: str, index: int, *history: Attempt, step: int = 0) -> TaskRecord:
    body = protocol.new_task(protocol.TaskKind(kind), index, step=step)
    body["history"] = list(history)
    return body


def attempt(n: int, worker: str, start: float, end: float | None = None,
            outcome: str | None = None) -> Attempt:
    entry = Attempt(attempt=n, worker=worker, start=NOW + round(start * 1000))
    if end is not None and outcome is not None:
        entry["end"] = NOW + round(end * 1000)
        entry["outcome"] = outcome
    return entry


TASKS = [
    task("map", 0, attempt(1, "w-1", 0, 1, "failed"), attempt(2, "w-2", 1, 2, "committed")),
    task("map", 1, attempt(1, "w-10", 0, 9, "committed")),
    task("map", 2, attempt(1, "w-2", 0, 0.5, "released"), attempt(2, "w-1", 1, 3, "leaseLost"),
         attempt(3, "w-1", 3, 4, "committed")),
    task("reduce", 0, attempt(1, "w-1", 9, 10, "committed")),
    task("reduce", 1, attempt(1, "w-2", 9)),  # still running
]


def test_one_bar_per_attempt_with_its_outcome_and_times() -> None:
    bars = timeline.bars(TASKS, NOW + 12_000)
    assert len(bars) == 8
    assert Counter(b.outcome for b in bars) == {"committed": 4, "failed": 1, "released": 1,
                                                "leaseLost": 1, "running": 1}
    running = next(b for b in bars if b.outcome == timeline.RUNNING)
    assert (running.task, running.start, running.end) == ("reduce-00001", 9.0, 12.0)
    assert [b.task for b in timeline.slowest(bars)] == ["map-00001", "map-00000",
                                                         "map-00002", "reduce-00000"]


def test_the_page_draws_each_bar_in_its_outcome_colour_rows_by_worker() -> None:
    page = timeline.render("wc", TASKS, NOW + 12_000, "Running")
    assert page.startswith("<!DOCTYPE html>\n" + timeline.MARKER)
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""), "self-contained: nothing to fetch"
    for outcome, count in {"committed": 4, "failed": 1, "released": 1, "leaseLost": 1,
                           "running": 1}.items():
        assert page.count(f'data-outcome="{outcome}"') == count
        colour = timeline.COLOURS[outcome]
        assert page.count(f'fill="{colour}"') == count + 1, "each bar, and its swatch"
    # Rows in natural order: w-2 above w-10.
    assert page.index(">w-1<") < page.index(">w-2<") < page.index(">w-10<")
    assert "map-00002 attempt 2 on w-1: 1.000s to 3.000s (2.000s), lease lost" in page
    assert ">map 9.000s<" in page and ">reduce 3.000s<" in page
    assert "<li>map-00001 attempt 1 on w-10: 9.000s</li>" in page


def test_a_backup_pair_is_two_bars_and_the_loser_names_the_twin_that_won() -> None:
    """Both attempts of each pair, as the protocol's writes leave them: map-00000's backup
    wins, map-00001's original does."""
    from .test_protocol import new_records, write

    records = new_records(maps=2)
    start = NOW / 1000
    for key, winner in (("map-00000", "w-2"), ("map-00001", "w-1")):
        original = write(records, protocol.claim(records[key], "w-1", start, 30.0, 3))
        assert original is not None
        pair = write(records, protocol.backup(original, "w-2", start + 2, 30.0))
        assert pair is not None
        won = write(records, protocol.commit(pair, winner, "out", now=start + 5))
        assert won is not None
    tasks = [records["map-00000"], records["map-00001"]]
    drawn = timeline.bars(tasks, NOW + 9000)
    assert sorted((b.task, b.attempt, b.worker, b.outcome) for b in drawn) == [
        ("map-00000", 1, "w-1", "backup"), ("map-00000", 2, "w-2", "committed"),
        ("map-00001", 1, "w-1", "committed"), ("map-00001", 2, "w-2", "backup")]
    page = timeline.render("pairs", tasks, NOW + 9000)
    assert page.count('data-outcome="backup"') == 2
    assert page.count(f'fill="{timeline.COLOURS["backup"]}"') == 3, "two bars, one swatch"
    assert ">lost to twin</text>" in page
    assert ("map-00000 attempt 1 on w-1: 0.000s to 5.000s (5.000s), lost to backup attempt 2"
            in page)
    assert ("map-00001 attempt 2 on w-2: 2.000s to 5.000s (3.000s), lost to original attempt 1"
            in page)
    assert "map-00000 attempt 2 on w-2: 2.000s to 5.000s (3.000s), committed" in page


def test_names_are_escaped_everywhere() -> None:
    evil = '<img src=x onerror="alert(1)">&'
    body = task("map", 0, attempt(1, evil, 0, 1, "committed"))
    page = timeline.render(evil, [body], NOW + 2000, evil)
    assert evil not in page and "<img" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in page


def test_steps_of_a_multi_step_job_are_stages_of_their_own() -> None:
    tasks = [task("map", 0, attempt(1, "w", 0, 1, "committed")),
             task("reduce", 0, attempt(1, "w", 1, 2, "committed")),
             task("map", 0, attempt(1, "w", 2, 3, "committed"), step=1)]
    page = timeline.render("steps", tasks, NOW, "")
    for label in ("step 1 map", "step 1 reduce", "step 2 map"):
        assert f">{label} 1.000s<" in page
    assert "step 2 map-00000 attempt 1" not in page, "task keys already name the step"
    assert "s2-map-00000 attempt 1 on w" in page


def test_a_job_with_no_attempts_yet_is_an_empty_chart() -> None:
    page = timeline.render("new", [task("map", 0)], NOW, "Pending")
    assert "no attempts recorded yet" in page and 'class="bar"' not in page


@pytest.mark.parametrize(("existing", "message"), [
    ("my notes", "{page} exists and was not written by kubemr; not overwriting it"),
    (None, "{page}: directory {parent} does not exist"),
])
def test_run_refuses_a_timeline_file_it_did_not_write_before_running(
        tmp_path: Path, existing: str | None, message: str) -> None:
    page = tmp_path / "notes.html"
    if existing is None:
        page = tmp_path / "missing" / "timeline.html"
    else:
        page.write_text(existing)
    done = subprocess.run(
        [KUBEMR, "run", str(ROOT / "tests" / "jobs" / "straggler.py"), "--input",
         str(tmp_path), "--output", str(tmp_path / "out"), "--timeline", str(page)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "kubemr: error: " + message.format(page=page,
                                                                     parent=page.parent)
    assert not (tmp_path / "out").exists(), "refused before running"
    if existing is not None:
        assert page.read_text() == existing


# --- a real job, in a real browser ------------------------------------------------------


def chromium() -> str:
    found = os.environ.get("KUBEMR_CHROMIUM") or shutil.which("chromium")
    assert found, "chromium is missing: scripts/test installs it (hack/ensure-chromium.sh)"
    return found


def screenshot(page: Path, png: Path, profile: Path, height: int) -> None:
    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={png}",
         f"--window-size={timeline.WIDTH + 40},{height}", page.as_uri()],
        check=True, capture_output=True, timeout=120)


def shapes(png: Path, colour: str, min_height: int) -> list[tuple[int, int, int, int]]:
    """The bounding boxes of the connected areas of exactly ``colour`` at least
    ``min_height`` pixels tall (bars; the legend's swatches are smaller)."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    target = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    seen: set[tuple[int, int]] = set()
    found = []
    for y0 in range(height):
        for x0 in range(width):
            if (x0, y0) in seen or pixels[x0, y0] != target:
                continue
            stack, box = [(x0, y0)], [x0, y0, x0, y0]
            seen.add((x0, y0))
            while stack:
                x, y = stack.pop()
                box = [min(box[0], x), min(box[1], y), max(box[2], x), max(box[3], y)]
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if (0 <= nx < width and 0 <= ny < height and (nx, ny) not in seen
                            and pixels[nx, ny] == target):
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            if box[3] - box[1] + 1 >= min_height:
                found.append((box[0], box[1], box[2], box[3]))
    return found


@pytest.mark.slow
def test_a_straggler_jobs_timeline_in_headless_chromium(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEMR_LOG_DIR", str(tmp_path / "logs"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(8):
        (inputs / f"f{i}.txt").write_text("x\n")
    page = tmp_path / "timeline.html"
    done = subprocess.run(
        [KUBEMR, "run", str(ROOT / "tests" / "jobs" / "straggler.py"), "--input", str(inputs),
         "--output", str(tmp_path / "out"), "--workers", "3", "--reducers", "2",
         "--timeline", str(page), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    # Backup tasks are on: an idle worker may back up the straggler once it has run 1 s
    # (the floor; the other maps take 0.4 s), and the original, ahead, wins. Its bar is
    # then the backup's, lost to its twin. No other task runs long enough for a backup.
    backups = re.findall(r'data-outcome="backup"><title>(\S+) attempt', html)
    assert backups in ([], ["map-00003"]), backups
    assert html.count('class="bar"') == 8 + 1 + 2 + len(backups), (
        "8 maps, f5's failed attempt, 2 reduces, the straggler's backup if it had one")

    png = tmp_path / "timeline.png"
    svg_height = int(html.split('height="', 2)[1].split('"')[0])  # the svg's (after <rect>)
    screenshot(page, png, tmp_path / "profile", svg_height + 260)
    committed = shapes(png, timeline.COLOURS["committed"], timeline.BAR_HEIGHT - 2)
    failed = shapes(png, timeline.COLOURS["failed"], timeline.BAR_HEIGHT - 2)
    assert len(committed) == 10, committed
    assert len(failed) == 1, failed
    assert len(shapes(png, timeline.COLOURS["backup"], timeline.BAR_HEIGHT - 2)) == len(backups)
    for outcome in ("leaseLost", "released", "running"):  # only their legend swatches
        assert shapes(png, timeline.COLOURS[outcome], timeline.BAR_HEIGHT - 2) == []
        assert len(shapes(png, timeline.COLOURS[outcome], timeline.SWATCH - 2)) == 1
    # The straggler slept 2.5 s, so its attempt took at least that; the widest bar drawn
    # is the longest committed attempt at the page's scale, and the one called out first.
    committed_titles = re.findall(r"<title>(\S+) attempt \d+ on [^:<]+: \S+ to \S+ "
                                  r"\(([0-9.]+)s\), committed", html)
    assert len(committed_titles) == 10
    seconds = dict(committed_titles)
    assert float(seconds["map-00003"]) >= 2.5
    longest = max(float(s) for s in seconds.values())
    span = re.search(r"over ([0-9.]+)s</p>", html)
    assert span is not None
    scale = (timeline.WIDTH - timeline.LEFT - timeline.RIGHT) / float(span.group(1))
    widest = max(box[2] - box[0] + 1 for box in committed)
    assert abs(widest - longest * scale) <= 3, (widest, longest * scale)
    first = html.split("<ol><li>")[1].split("</li>")[0]
    assert first.endswith(f": {longest:.3f}s") or first.endswith(f": {longest:.1f}s"), first
    keep = os.environ.get("KUBEMR_TIMELINE_SCREENSHOT")  # docs/images/timeline.png
    if keep:
        shutil.copyfile(png, keep)
