"""Exec wrapper: the child dies with meshd, however meshd dies.

    python3 -I -S /path/to/_pdeathsig.py PARENT_PID BINARY [ARGS...]

Twisted's ``spawnProcess`` has no pre-exec hook, so this tiny program runs in
the child between fork and the real binary.  It

1. asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``; the
   setting survives ``execv``), which covers the one exit a supervisor cannot
   clean up after itself: ``kill -9`` of meshd;
2. checks that the parent is still ``PARENT_PID`` (meshd may have died between
   fork and prctl, in which case the signal would never come);
3. moves into its own process group, so meshd can signal the whole group and
   a Ctrl-C on meshd's terminal reaches meshd alone, which then stops the
   child in order;
4. replaces itself with ``BINARY`` (same pid, so meshd's pid is the real one).

The kernel sends the signal when the *thread* that forked the child ends, so
children must be spawned from the reactor (main) thread, as Twisted requires
anyway.  It uses only the standard library and is run by path, not as ``-m``, so it
works whether or not meshd is importable from the child's working directory.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[1].isdigit():
        sys.stderr.write("usage: _pdeathsig.py PARENT_PID BINARY [ARGS...]\n")
        return 2
    parent, binary, args = int(argv[1]), argv[2], argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}\n")
        return 1
    if os.getppid() != parent:
        sys.stderr.write(f"parent {parent} already gone, not starting {binary}\n")
        return 1
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group leader; the death signal is what matters
    try:
        os.execv(binary, args)
    except OSError as e:
        sys.stderr.write(f"cannot execute {binary}: {e.strerror}\n")
        return 127
    return 127  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv))
