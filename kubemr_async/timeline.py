"""A job's timeline as one self-contained HTML page: task records in, a string out.

Pure (no I/O, no clock): `kubemr timeline` (a cluster's records) and `kubemr run
--timeline` (the local store's) read the records and write the string. The page is a
Gantt chart drawn as inline SVG, one row per worker and one bar per attempt (from the
task records' ``history``, :class:`~kubemr_async.records.Attempt`), coloured by outcome,
with the map and reduce stages (per step of a multi-step job) marked over the time axis
and the slowest tasks called out. It loads nothing (no script, no font, no network), so
it opens anywhere, offline, and a browser draws the same thing in a test.

Task and worker names are user-influenced (job names, pod names), so every text and
attribute goes through :func:`html.escape`.

Times are the writers' clocks (see ``Attempt``): bars of two workers whose clocks
disagree are off by that much.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import NotRequired, TypedDict

from .protocol import AttemptOutcome, TaskKind, inputs_label, map_key, reduce_key
from .records import Attempt, TaskRecord

#: What the worker that stamps a cluster job Succeeded leaves beside its ``_SUCCESS``
#: manifest: every task's attempts (:func:`kept`), since the operator then deletes the
#: task records and `kubemr timeline` still wants to draw the job.
FILE = "_timeline.json"


class TaskAttempts(TypedDict):
    """The fields of a task record that a timeline draws (:func:`kept` makes one)."""

    kind: str
    index: int
    step: NotRequired[int]
    history: NotRequired[list[Attempt]]
    #: A map's input, and how many more splits a batched map holds (``inputs_label``).
    inputs: NotRequired[str]


def kept(tasks: Iterable[TaskRecord]) -> list[TaskAttempts]:
    """Only what a timeline needs of each task record: what :data:`FILE` holds."""
    result = []
    for body in tasks:
        entry = TaskAttempts(kind=body["kind"], index=body["index"],
                             history=body.get("history") or [])
        if body.get("step"):
            entry["step"] = body["step"]
        if body["kind"] == TaskKind.MAP:
            entry["inputs"] = inputs_label(body)
        result.append(entry)
    return result


def _name(body: TaskAttempts) -> str:
    key = map_key if body["kind"] == TaskKind.MAP else reduce_key
    return key(body["index"], body.get("step", 0))

#: The page's second line: what `kubemr` recognises as a page it wrote (and so may replace).
MARKER = "<!-- kubemr timeline -->"
#: The fill of each outcome's bars (and its legend swatch). A still running attempt (no
#: outcome yet) is drawn up to the time the page was made.
RUNNING = "running"
COLOURS = {
    AttemptOutcome.COMMITTED.value: "#2e7d32",
    AttemptOutcome.FAILED.value: "#d32f2f",
    AttemptOutcome.LEASE_LOST.value: "#ef6c00",
    AttemptOutcome.RELEASED.value: "#1565c0",
    AttemptOutcome.BACKUP.value: "#6d4c41",
    RUNNING: "#8e24aa",
}
LABELS = {AttemptOutcome.COMMITTED.value: "committed", AttemptOutcome.FAILED.value: "failed",
          AttemptOutcome.LEASE_LOST.value: "lease lost",
          AttemptOutcome.RELEASED.value: "released",
          AttemptOutcome.BACKUP.value: "lost to twin", RUNNING: "running"}
#: How many of the longest committed attempts are called out.
SLOWEST = 5

# Geometry (px). Bars are BAR_HEIGHT tall and at least MIN_BAR wide, each with a white
# edge, so neighbours never merge into one shape; legend swatches are smaller than bars.
WIDTH = 1200
LEFT = 190
RIGHT = 30
ROW = 26
BAR_HEIGHT = 18
MIN_BAR = 4
SWATCH = 10
LEGEND_TOP = 14
STAGES_TOP = 40
STAGE_ROW = 18
AXIS_HEIGHT = 22


@dataclass(frozen=True)
class Bar:
    """One attempt as drawn: times in seconds since the job's first attempt started."""

    task: str
    kind: str
    step: int
    attempt: int
    worker: str
    start: float
    end: float
    outcome: str  # an AttemptOutcome value, or RUNNING
    inputs: str = ""  # a map's input, and how many more splits a batched map holds

    @property
    def seconds(self) -> float:
        return self.end - self.start


def bars(tasks: Iterable[TaskAttempts], now_ms: int) -> list[Bar]:
    """Every attempt the records keep, as bars; a running one ends at ``now_ms`` (Unix
    ms, when the page is made), and none ends before it starts."""
    raw = [(body, entry) for body in tasks for entry in body.get("history") or []]
    if not raw:
        return []
    origin = min(entry["start"] for _, entry in raw)
    drawn = []
    for body, entry in raw:
        end = entry.get("end", now_ms)
        drawn.append(Bar(_name(body), body["kind"], body.get("step", 0), entry["attempt"],
                         entry["worker"], (entry["start"] - origin) / 1000,
                         (max(end, entry["start"]) - origin) / 1000,
                         entry.get("outcome", RUNNING), body.get("inputs", "")))
    return sorted(drawn, key=lambda b: (b.start, b.task, b.attempt))


def slowest(drawn: Sequence[Bar], count: int = SLOWEST) -> list[Bar]:
    """The ``count`` longest committed attempts, longest first: a job's stragglers."""
    done = [b for b in drawn if b.outcome == AttemptOutcome.COMMITTED]
    return sorted(done, key=lambda b: (-b.seconds, b.task))[:count]


def _lost_to(bar: Bar, winners: dict[tuple[str, int, float], int]) -> str:
    """A ``backup`` bar's label, naming the twin that beat it: the backup (a higher
    attempt number) or the original it backed up (a lower one). The winner's commit
    closed both entries in one write, at one time, so it is the task's committed bar that
    ends when this one does."""
    winner = winners.get((bar.task, bar.step, bar.end))
    if winner is None:  # the twin failed the task (or the clocks disagree)
        return "ended by its twin"
    return f"lost to {'backup' if winner > bar.attempt else 'original'} attempt {winner}"


def _natural(text: str) -> list[object]:
    """``local-2`` before ``local-10``: numbers in worker names compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _tick(span: float) -> float:
    """A round tick interval (1, 2 or 5 times a power of ten) giving 5 to 10 ticks."""
    raw = max(span, 1e-3) / 8
    power = 10.0 ** math.floor(math.log10(raw))
    return next(power * m for m in (1, 2, 5, 10) if power * m >= raw)


def _seconds(value: float) -> str:
    return f"{value:.3f}s" if value < 10 else f"{value:.1f}s"


def _stages(drawn: Sequence[Bar]) -> list[tuple[str, float, float]]:
    """Each stage (a step's maps, its reduces) with the span of its attempts, in order."""
    steps = {b.step for b in drawn}
    spans: dict[tuple[int, int], tuple[float, float]] = {}
    for b in drawn:
        key = (b.step, 0 if b.kind == TaskKind.MAP else 1)
        start, end = spans.get(key, (b.start, b.end))
        spans[key] = (min(start, b.start), max(end, b.end))
    named = []
    for (step, kind), (start, end) in sorted(spans.items()):
        label = "map" if kind == 0 else "reduce"
        named.append((f"step {step + 1} {label}" if len(steps) > 1 else label, start, end))
    return named


def _stage_label(x: Callable[[float], float], label: str, start: float, end: float,
                 y: float) -> str:
    """A stage's name and length, inside its band's left end, or right-aligned to its
    right end when it starts near the chart's right edge."""
    text = f"{escape(label)} {_seconds(end - start)}"
    if x(start) > WIDTH - RIGHT - 160:
        return f'<text x="{x(end) - 4}" y="{y + STAGE_ROW - 5}" text-anchor="end">{text}</text>'
    return f'<text x="{x(start) + 4}" y="{y + STAGE_ROW - 5}">{text}</text>'


def render(job: str, tasks: Iterable[TaskAttempts], now_ms: int, subtitle: str = "") -> str:
    """The whole page for job ``job``: its title, the chart and the slowest tasks.

    ``now_ms``: when the page is made (Unix ms), where running attempts end. ``subtitle``:
    a line under the title (the phase, say).
    """
    drawn = bars(tasks, now_ms)
    workers = sorted({b.worker for b in drawn}, key=_natural)
    span = max((b.end for b in drawn), default=0.0) or 1.0
    stages = _stages(drawn)
    scale = (WIDTH - LEFT - RIGHT) / span
    chart_top = STAGES_TOP + STAGE_ROW * len(stages) + AXIS_HEIGHT
    height = chart_top + ROW * max(len(workers), 1) + 10
    rows = {worker: chart_top + ROW * i for i, worker in enumerate(workers)}
    top = slowest(drawn)
    ranks = {(b.task, b.step, b.attempt): i for i, b in enumerate(top, 1)}
    winners = {(b.task, b.step, b.end): b.attempt for b in drawn
               if b.outcome == AttemptOutcome.COMMITTED}

    def x(seconds: float) -> float:
        return round(LEFT + seconds * scale, 1)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>']
    legend_x = LEFT
    for outcome, colour in COLOURS.items():
        svg.append(f'<rect class="swatch" x="{legend_x}" y="{LEGEND_TOP}" width="{SWATCH}" '
                   f'height="{SWATCH}" fill="{colour}"/><text x="{legend_x + SWATCH + 4}" '
                   f'y="{LEGEND_TOP + SWATCH}">{escape(LABELS[outcome])}</text>')
        legend_x += 110
    svg.append(f'<text x="{legend_x}" y="{LEGEND_TOP + SWATCH}">'
               f'&#9733; slowest committed attempts</text>')
    for i, (label, start, end) in enumerate(stages):
        y = STAGES_TOP + STAGE_ROW * i
        width = max(x(end) - x(start), 1.0)
        svg.append(f'<g class="stage"><title>{escape(label)}: {_seconds(start)} to '
                   f'{_seconds(end)} ({_seconds(end - start)})</title>'
                   f'<rect x="{x(start)}" y="{y + 2}" width="{width:.1f}" '
                   f'height="{STAGE_ROW - 4}" fill="#cfd8dc"/>'
                   f'{_stage_label(x, label, start, end, y)}</g>')
        for edge in (start, end):
            svg.append(f'<line x1="{x(edge)}" y1="{y}" x2="{x(edge)}" y2="{height - 10}" '
                       f'stroke="#90a4ae" stroke-dasharray="3,3"/>')
    axis = chart_top - 6
    tick = _tick(span)
    for n in range(int(span / tick) + 1):
        t = n * tick
        svg.append(f'<line x1="{x(t)}" y1="{axis}" x2="{x(t)}" y2="{axis + 4}" '
                   f'stroke="#455a64"/><text x="{x(t)}" y="{axis - 3}" '
                   f'text-anchor="middle" fill="#455a64">{t:g}s</text>')
    for worker, y in rows.items():
        svg.append(f'<text x="{LEFT - 8}" y="{y + BAR_HEIGHT - 4}" text-anchor="end">'
                   f'{escape(worker)}</text><line x1="{LEFT}" y1="{y + ROW - 2}" '
                   f'x2="{WIDTH - RIGHT}" y2="{y + ROW - 2}" stroke="#eceff1"/>')
    stars = []  # drawn over every bar, so a later bar never hides one
    for b in drawn:
        rank = ranks.get((b.task, b.step, b.attempt))
        step = f"step {b.step + 1} " if len({d.step for d in drawn}) > 1 else ""
        label = (_lost_to(b, winners) if b.outcome == AttemptOutcome.BACKUP
                 else LABELS[b.outcome])
        title = (f"{step}{b.task} attempt {b.attempt} on {b.worker}: {_seconds(b.start)} to "
                 f"{_seconds(b.end)} ({_seconds(b.seconds)}), {label}"
                 + (f"; slowest #{rank}" if rank else "")
                 + (f"; input {b.inputs}" if b.inputs else ""))
        left = x(b.start)
        width = max(x(b.end) - left, MIN_BAR)
        y = rows[b.worker]
        svg.append(f'<g class="bar" data-outcome="{escape(b.outcome)}">'
                   f'<title>{escape(title)}</title><rect x="{left}" y="{y}" '
                   f'width="{width:.1f}" height="{BAR_HEIGHT}" fill="{COLOURS[b.outcome]}" '
                   f'stroke="#ffffff" stroke-width="1"/></g>')
        if rank:
            stars.append(f'<text x="{left + width - 3:.1f}" y="{y + BAR_HEIGHT - 5}" '
                         f'text-anchor="end" fill="#ffffff" font-weight="bold">'
                         f'&#9733;{rank}</text>')
    svg += stars
    svg.append("</svg>")
    listed = "".join(
        f"<li>{escape(b.task)} attempt {b.attempt} on {escape(b.worker)}: "
        f"{_seconds(b.seconds)}</li>" for b in top)
    summary = (f"{len(drawn)} attempts on {len(workers)} workers over {_seconds(span)}"
               if drawn else "no attempts recorded yet")
    return "\n".join([
        "<!DOCTYPE html>",
        MARKER,
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kubemr timeline: {escape(job)}</title>",
        "<style>body{font-family:sans-serif;margin:16px;color:#263238}"
        "h1{font-size:18px;margin:0 0 4px}p,li{font-size:13px}"
        "h2{font-size:15px;margin:12px 0 4px}</style></head><body>",
        f"<h1>Job {escape(job)}</h1>",
        f"<p>{escape(subtitle + ': ' if subtitle else '')}{escape(summary)}</p>",
        "".join(svg),
        "<h2>Slowest tasks</h2>",
        f"<ol>{listed}</ol>" if top else "<p>none committed yet</p>",
        "</body></html>",
        "",
    ])
