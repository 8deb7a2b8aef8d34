"""Progress bars for the long phases of a step (rank 0 only)."""

from __future__ import annotations

from contextlib import contextmanager


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def progress(enabled: bool, desc: str, total: int):
    """A tqdm bar that disappears when done, or nothing when disabled."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
