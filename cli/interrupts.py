"""Ctrl-C at any moment, imports included, ends the command within GRACE_S with exit 130 and one line.

Standard library only: installed before compress imports anything heavy."""

from __future__ import annotations

import os
import signal
import sys
import threading

interrupted = threading.Event()
reported = threading.Event()  # the "interrupted" line was printed
_print_lock = threading.Lock()


def report(line: str = "interrupted") -> None:
    """Print the one line, once, whichever thread gets there first."""
    with _print_lock:
        if not reported.is_set():
            print(line, file=sys.stderr, flush=True)
            reported.set()
GRACE_S = 2.0  # after Ctrl-C, the command's own cleanup gets this long before the process ends itself
_watching: list[bool] = []


def watch() -> None:
    """    SIGINT is blocked in every thread and taken by this one thread with sigwait, so it is seen at once even
    while the main thread sits in a long C call or a library swallows KeyboardInterrupt: the main thread
    gets a KeyboardInterrupt (its cleanup runs: staged outputs are removed), and if it has not finished
    after GRACE_S the process ends itself. Child processes inherit the mask; ours install the same watch."""
    if _watching or not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return
    _watching.append(True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def wait() -> None:
        import _thread
        import time

        while True:
            signal.sigwait({signal.SIGINT})
            if interrupted.is_set():
                break  # a second Ctrl-C: end now
            interrupted.set()
            _thread.interrupt_main()
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline:
                time.sleep(0.05)
            break
        report()
        os._exit(130)

    threading.Thread(target=wait, name="compress-sigint", daemon=True).start()
