"""A run's working directory: created, checked writable, and locked for one run at a time.

The lock is `flock` on WORKDIR/lock, held for the life of the run: a second run on the same
workdir fails at once and names the first (pid, host, start time), and the kernel releases
the lock when a run dies, however it dies (`kill -9` included), so a stale lock file never
blocks. In a multi-process run only process 0 locks (every process shares the workdir).
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket


class WorkdirError(ValueError):
    pass


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "lock")
        try:
            os.makedirs(workdir, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"workdir {workdir!r} cannot be created or written: "
                               f"{e.strerror or e}") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip()
            os.close(self._fd)
            holder = holder or "holder unknown"
            raise WorkdirError(f"workdir {workdir!r} is in use by another run ({holder}); "
                               "wait for it to end or use another workdir") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"
                  .encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
