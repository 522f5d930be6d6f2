"""Sweeps on Ray: each case (and each limits measurement) is one Ray task in a fresh worker process
(``max_calls=1``), with ``num_cpus`` = the case's threads and optionally a custom resource
(``device:NAME``) so tasks land only on nodes of one device class.

The task runs the same function as a local case (sfedge.benchmarks.worker.dispatch) and returns the
same record plus the node's ``hostname``; the sweep's output, printers, plots and regression gate are
those of a local run (benchmarks/runner.run_sweep with this executor). Ray is optional: ``pip install
sfedge[ray]``. Pointing at a cluster: docs/cost_model.md.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

from sfedge.errors import SfedgeError, UsageError

RESOURCE_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


def _run_job(job: dict) -> dict:
    """Inside the Ray worker: the local worker's dispatch, failures as records, plus where it ran."""
    import socket

    from sfedge.benchmarks.provenance import cpu_model
    from sfedge.benchmarks.worker import dispatch

    threads = (job.get("case") or {}).get("threads") or job.get("threads")
    if threads and hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        if len(available) > threads:  # Ray does not pin CPUs
            os.sched_setaffinity(0, available[:threads])
    try:
        result = dispatch(job)
    except SfedgeError as exc:
        result = {"status": "failed", "note": str(exc)}
    result["hostname"] = socket.gethostname()
    result["node_cpu"] = cpu_model()
    return result


def parse_resource(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    if not RESOURCE_RE.match(text) or not text.startswith("device:") or text == "device:":
        raise UsageError(f"--ray-resource takes device:NAME (letters, digits, _ . - :), got {text!r}")
    return text


@dataclass
class RayExecutor:
    """``address``: None or "local" starts a local Ray instance; "auto" or HOST:PORT / ray://... joins a cluster."""

    address: Optional[str] = None
    resource: Optional[str] = None
    num_cpus: Optional[int] = None  # CPUs of a local instance (default: all)

    def __post_init__(self):
        try:
            import ray
        except ModuleNotFoundError:
            raise SfedgeError("--ray needs Ray, which is not installed: pip install 'sfedge[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if self.address in (None, "", "local"):
                if self.num_cpus:
                    kwargs["num_cpus"] = self.num_cpus
                if self.resource:
                    kwargs["resources"] = {self.resource: 1000}
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SfedgeError(f"--ray {self.address or 'local'}: cannot start or join Ray ({exc})") from None
        self._remote = ray.remote(max_calls=1)(_run_job)

    def _submit(self, job: dict, threads: Optional[int]) -> dict:
        options = {"num_cpus": threads or 1}  # max_calls=1 is set on the remote function itself
        if self.resource:
            options["resources"] = {self.resource: 1}
        try:
            return self._ray.get(self._remote.options(**options).remote(job))
        except self._ray.exceptions.RayError as exc:
            return {"status": "failed", "note": f"Ray task failed: {str(exc).splitlines()[0][:400]}"}

    def measure_limits(self, threads: Optional[int], progress: Callable[[str], None]) -> dict:
        result = self._submit({"kind": "limits", "threads": threads}, threads)
        if result.get("status") == "failed":
            raise SfedgeError(f"measuring the machine's limits on Ray failed: {result['note']}")
        return result

    def run_case(self, case, progress: Callable[[str], None]) -> dict:
        result = self._submit({"kind": "case", "case": case.to_dict()}, case.threads)
        progress(f"  ran on {result.get('hostname', '?')}")
        if result.get("status") == "failed":
            return {"key": case.key, "name": case.name, "source": case.source.label, "status": "failed",
                    "note": result.get("note", ""), "case": case.to_dict(), "hostname": result.get("hostname", "")}
        return result

    def shutdown(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()
