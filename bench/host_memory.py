"""This process's host memory, read from /proc/self (Linux): the one reader shared by the benches
in this folder and the memory tests (tests import it as `bench.host_memory`; a bench script run as
`python bench/x.py` imports it as `host_memory`, its own folder being first on sys.path).

Fields are /proc/self/status names: VmRSS (resident now), VmHWM (peak resident), RssAnon (heap,
ours), RssFile / RssShmem (file-backed and shared pages: memory-mapped files, page cache).
"""

from __future__ import annotations

import threading


def status_kib(field: str) -> int:
    """/proc/self/status `field` in KiB (0 where the kernel does not report it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Set VmHWM to the current VmRSS, so a later VmHWM measures what ran since. False where
    /proc/self/clear_refs is not writable (some containers): VmHWM then still holds older peaks."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Peak VmRSS (KiB) seen by a background thread polling every millisecond until stop(): the
    fallback where reset_peak() is refused. It sees any peak that lasts longer than a poll."""

    def __init__(self):
        self.peak, self.done = status_kib("VmRSS"), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, status_kib("VmRSS"))

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, status_kib("VmRSS"))
