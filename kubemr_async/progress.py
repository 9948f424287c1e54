"""Job progress as bars on stderr: `kubemr run`, `submit --wait` and `status --watch`."""

from __future__ import annotations

from . import protocol


class ProgressBar:
    """Maps and reduces done/total, time elapsed and the ETA at the rate so far, on stderr
    (rich draws only when stderr is a terminal)."""

    def __init__(self, label: str = "") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=Console(stderr=True),
                                  transient=False)
        prefix = f"{label} " if label else ""  # a multi-step job's step: "step 2/3 (top) "
        self._maps = self._progress.add_task(f"{prefix}maps", total=None)
        self._reduces = self._progress.add_task(f"{prefix}reduces", total=None)
        self._progress.start()

    def update(self, progress: protocol.Progress) -> None:
        self._progress.update(self._maps, completed=progress.maps_done,
                              total=progress.maps_total)
        self._progress.update(self._reduces, completed=progress.reduces_done,
                              total=progress.reduces_total)

    def close(self) -> None:
        self._progress.stop()
