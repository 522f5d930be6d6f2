"""Where a number came from: sfedge version and git commit, library versions, CPU model and the
CPU flags kernels dispatch on (AVX2, AVX-512, VNNI, AMX), threads."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Iterable, List

# CPU flags (as /proc/cpuinfo spells them) that decide which int8/fp32 kernels XNNPACK, ONNX Runtime,
# oneDNN and llama.cpp can use: exact names, plus every avx512* and amx* flag.
KERNEL_FLAGS = ("sse4_2", "fma", "f16c", "bmi2", "avx", "avx2", "avx_vnni", "avx_vnni_int8", "avx_ne_convert", "asimd",
                "asimddp", "i8mm", "sve", "sme")
KERNEL_FLAG_PREFIXES = ("avx512", "amx")
LIBRARIES = ("torch", "executorch", "torchao", "onnxruntime", "coremltools", "tokenizers", "numpy", "opencv-python-headless")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_flags(flags: Iterable[str]) -> List[str]:
    """The kernel-relevant subset of a CPU's flags, sorted."""
    return sorted({flag for flag in flags if flag in KERNEL_FLAGS or flag.startswith(KERNEL_FLAG_PREFIXES)})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> List[str]:
    """Kernel-relevant flags of the first CPU in /proc/cpuinfo ('flags' on x86, 'Features' on Arm);
    empty where there is no /proc/cpuinfo (macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    match = re.search(r"^(flags|features)\s*:(.*)$", text, re.IGNORECASE | re.MULTILINE)
    return kernel_flags(match.group(2).split()) if match else []


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the sfedge checkout (empty outside a git checkout); '+dirty' when files changed."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=root)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=root)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance() -> dict:
    from sfedge import __version__

    return {"sfedge_version": __version__, "git_commit": git_commit(), "libraries": library_versions(),
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
