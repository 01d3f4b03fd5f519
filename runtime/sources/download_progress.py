"""Download progress for huggingface_hub: a tqdm class that reports bytes to a callback, and
a rich bar on stderr that such a callback can draw."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .pypi_fetch import ProgressFn


def reporting_tqdm(progress: ProgressFn):
    """A tqdm class for huggingface_hub's downloads that draws nothing and reports
    `progress(done, total)` in bytes (a resumed download starts at its `initial` bytes)."""
    from tqdm import tqdm

    class Report(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.done = kwargs.get("initial", 0)

        def update(self, n=1):
            self.done += n
            progress(self.done, self.total or 0)

    return Report


@contextlib.contextmanager
def download_bar(what: str) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr, 'downloading <what>', fed by the callback it yields."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    # one line of at most 80 columns for a short `what`
    with Progress(TextColumn(f"downloading {what}"), BarColumn(bar_width=20),
                  DownloadColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("download", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update
