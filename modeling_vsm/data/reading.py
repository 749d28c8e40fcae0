"""What the file readers share: JSON reading (`_read_json`, `_read_json_list`) and the counter of skipped items
(`SkipLog`, whose skips `collect_skipped` gathers)."""

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


MAX_LOGGED_SKIPS = 10  # per loader: the first skipped items are logged one by one, then only counted
_SKIP_COLLECTORS = []  # lists opened by `collect_skipped`; every skipped item is appended to each


@contextmanager
def collect_skipped():
    """Collects every item the loaders skip inside the block (not only the logged first few), as dicts
    `{"what", "where", "reason"}`: `vsm eval` lists them next to its metrics.

    >>> with collect_skipped() as skipped:
    ...     dataset = load_data_spec("reasonseg:PATH")
    """
    skipped = []
    _SKIP_COLLECTORS.append(skipped)
    try:
        yield skipped
    finally:
        _SKIP_COLLECTORS.remove(skipped)


class SkipLog:
    """Counts the items a loader skips, by reason; logs the first few and a summary naming the file."""

    def __init__(self, what: str):
        self.what, self.reasons, self.total, self.logged = what, {}, 0, 0

    def skip(self, where, reason: str, counted: bool = True) -> None:
        """Records one problem; `counted=False` for a part dropped from an item that is kept."""
        self.total += counted
        for collector in _SKIP_COLLECTORS if counted else ():
            collector.append({"what": self.what, "where": str(where), "reason": reason})
        # "shape 3: 2 points" and "shape 1: 1 points" count together, as do missing images at any path
        key = re.sub(r"\d+", "N", re.sub(r"\S*[/\\]\S*", "PATH", reason))
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if self.logged < MAX_LOGGED_SKIPS:
            self.logged += 1
            logger.warning("%s %s %s: %s.", "Skipping" if counted else "Using part of", self.what, where, reason)

    def report(self, source, seen: int) -> None:
        if self.total:
            reasons = ", ".join(f"{count} x {reason}" for reason, count in sorted(self.reasons.items()))
            logger.warning("%s %s: skipped %d of %d items (%s).", self.what, source, self.total, seen, reasons)

    def fail_if_empty(self, num_rows: int, source, seen: int) -> None:
        if not num_rows:
            raise ValueError(f"No usable sample in {str(source)!r}: {self.total} of {seen} items ({self.what}) skipped.")


def _read_json_list(path: Path, name: str, expected: str) -> list:
    """The JSON list in `path`; a ValueError naming `name` and the file when it is unreadable or not a list."""
    try:
        items = _read_json(path)
    except ValueError as error:
        raise ValueError(f"{name} {path}: {error}") from None
    if not isinstance(items, list):
        raise ValueError(f"{name} {path} must hold {expected}, got {type(items).__name__}.")
    return items


def _read_json(path: Path):
    """Parses a JSON file, falling back to cp1252 as LISA's reader does; raises ValueError on invalid JSON."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from None
