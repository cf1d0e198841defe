"""How many threads a llama.cpp call may use now: the cores other processes leave free.

llama.cpp's CPU threads meet at a barrier after every operation of the graph
and spin while they wait. With two threads on two cores and one busy neighbour,
one of the two is descheduled for a time slice at a time while the other spins
at the barrier: the demo took 19 minutes beside one busy process against about
4 alone. One thread per free core avoids that: beside a neighbour taking one
core, a call runs on the other and both get their fair share.

:class:`CoreShare` measures, between two calls, the CPU time the whole machine
spent busy minus what this process spent (``psutil``: system-wide and
per-process CPU times), so this process's own spinning never counts against
it, and answers ``round(cores - others' busy cores)``, clamped to
``[1, max_threads]``. The backend applies it with ``llama_set_n_threads``
before each call, so the count follows the neighbours as they come and go.
"""

from __future__ import annotations

import os
import time

import psutil


class CoreShare:
    """The number of threads this process may use now.

    Args:
        max_threads: the most threads to use (the tier's ``n_threads`` ceiling;
            default: the machine's logical cores).
        min_interval_s: measurements closer together than this reuse the last
            answer (a window too short to tell a neighbour's load from noise).

    :meth:`threads` returns an int in ``[1, max_threads]``; the first call
    (no window yet) measures over a 0.1 s sleep.
    """

    def __init__(self, max_threads: int | None = None, *, min_interval_s: float = 0.25):
        self.cores = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        self.max_threads = max(1, min(max_threads or self.cores, self.cores))
        self.min_interval_s = min_interval_s
        self._proc = psutil.Process()
        self._last: tuple[float, float, float] | None = None
        self._answer = self.max_threads
        self.others_busy = 0.0
        """Cores the rest of the machine kept busy over the last window."""

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        own = sum(self._proc.cpu_times()[:2])
        return time.monotonic(), busy, own

    def threads(self) -> int:
        """Threads for the next call: ``round(cores - others' busy cores)`` in ``[1, max_threads]``."""
        if self.max_threads == 1:
            return 1
        if self._last is None:
            self._last = self._sample()
            time.sleep(0.1)
        now = self._sample()
        wall = now[0] - self._last[0]
        if wall < self.min_interval_s:
            return self._answer  # the window keeps growing from the same start
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / max(wall, 1e-9)
        self._last = now
        self.others_busy = min(others, float(self.cores))
        self._answer = max(1, min(self.max_threads, round(self.cores - self.others_busy)))
        return self._answer
