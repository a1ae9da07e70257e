"""Counted drops: what the node refused from a client, a peer or a file, by reason. Pure.

A bad message costs one dropped, counted, logged message, never more: every place that
refuses input calls ``drops.drop(reason, detail)``. The count goes to ``$SYS/zmesh/node``
and the metrics; the log is rate-limited per reason, as python-zeroconf's ``QuietLogger``
does it: the first occurrence of a reason at WARNING, repeats at DEBUG, and at most one
WARNING per reason per ``summary_interval`` saying how many were dropped since. A hostile
peer sending a million bad frames therefore costs a million counter increments and a
handful of log lines.

Memory is bounded: reasons are the code's own constants (never text from the peer), and
past ``max_reasons`` distinct reasons new ones count under ``other``. ``detail`` may carry
peer-chosen text: it is cut to ``DETAIL_LIMIT`` characters and never stored.

May import: the standard library. Imported by every room that refuses input, and the node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

DETAIL_LIMIT = 200
OTHER = "other"


class Drops:
    def __init__(
        self,
        log: logging.Logger,
        now: Callable[[], float] = time.monotonic,
        summary_interval: float = 60.0,
        max_reasons: int = 256,
    ) -> None:
        self.log = log
        self.now = now
        self.summary_interval = summary_interval
        self.max_reasons = max_reasons
        self.counts: dict[str, int] = {}
        self._last_warning: dict[str, float] = {}
        self._since_warning: dict[str, int] = {}

    def drop(self, reason: str, detail: str = "", count: int = 1) -> None:
        """``count`` messages were dropped for ``reason`` (a constant such as
        ``"mesh_bad_frame"``); ``detail`` says which (peer, topic) for the log only."""
        counts = self.counts
        if reason not in counts and len(counts) >= self.max_reasons:
            reason = OTHER
        counts[reason] = counts.get(reason, 0) + count
        if len(detail) > DETAIL_LIMIT:
            detail = detail[:DETAIL_LIMIT] + "..."
        now = self.now()
        last = self._last_warning.get(reason)
        if last is None or now - last >= self.summary_interval:
            suppressed = self._since_warning.pop(reason, 0)
            self._last_warning[reason] = now
            more = f" ({suppressed} more since the last warning)" if suppressed else ""
            self.log.warning("dropped %d (%s)%s%s", count, reason, f": {detail}" if detail else "", more)
        else:
            self._since_warning[reason] = self._since_warning.get(reason, 0) + count
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("dropped %d (%s)%s", count, reason, f": {detail}" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)
