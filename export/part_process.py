"""Run one export function in a second Python process (spawned: a fresh interpreter, no forked torch state)
while this process goes on: the vision encoder and projectors lower on the second core while the LLM lowers on
the first (ExecuTorch's lowering is single-threaded Python).

``PartProcess(fn, *args)`` starts ``fn(*args)`` in the child; ``result()`` waits and returns its value, or raises
its error here (an SfedgeError as itself, anything else as an SfedgeError naming the part and the child's last
traceback line). Leaving the ``with`` block early (an error or Ctrl-C here) kills the child.
"""
from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Callable

from sfedge.errors import SfedgeError

JOIN_SECONDS = 5.0


def _child_main(connection, fn: Callable, args: tuple) -> None:
    try:
        connection.send(("ok", fn(*args)))
    except SfedgeError as exc:
        connection.send(("sfedge", exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it as one line
        lines = traceback.format_exception_only(type(exc), exc)
        connection.send(("error", lines[-1].strip() if lines else type(exc).__name__))
    finally:
        connection.close()


class PartProcess:
    """``fn(*args)`` in a spawned child process; ``fn`` and ``args`` must be picklable (module-level function)."""

    def __init__(self, label: str, fn: Callable, *args: Any):
        self.label = label
        context = multiprocessing.get_context("spawn")
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, args=(send, fn, args), name=f"sfedge-export-{label}",
                                        daemon=True)
        self._process.start()
        send.close()  # the child holds the only sending end: EOF here when it dies without a word
        self._done = False

    @property
    def pid(self) -> int:
        return self._process.pid

    def __enter__(self) -> "PartProcess":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.kill()

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(JOIN_SECONDS)
        self._done = True

    def result(self) -> Any:
        """Wait for the child; its return value, or its error raised here."""
        try:
            kind, value = self._receive.recv()
        except EOFError:
            self._process.join(JOIN_SECONDS)
            code = self._process.exitcode
            raise SfedgeError(f"the {self.label} export process ended without a result (exit code {code}; "
                              f"killed for memory?); rerun with --serial to export it in this process") from None
        finally:
            self._process.join(JOIN_SECONDS)
            self._done = True
        if kind == "sfedge":
            raise value
        if kind == "error":
            raise SfedgeError(f"the {self.label} export process failed: {value}")
        return value
