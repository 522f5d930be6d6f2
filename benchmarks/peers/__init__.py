"""Side by side with a peer on the same LLM: prefill N tokens, decode G, alternating in the same run.

    python -m sfedge.benchmarks.peers --model tiny --prompt-tokens 128 --gen-tokens 32
    python -m sfedge.benchmarks.peers out/tiny_executorch_8da4w --threads 2
    python -m sfedge.benchmarks.peers out/sf1b_et_8da4w --peer executorch-runner --prompt-tokens 100 --gen-tokens 64
    python -m sfedge.benchmarks.peers out/sf1b_et_8da4w --peer llama.cpp --quant Q4_0,Q8_0 --prompt-tokens 100,1500
    python -m sfedge.benchmarks.peers --model sf-llava-1.5-1b --peer llama.cpp --no-ours --prompt-tokens 100

Ours runs through the runtime (ours.py: the eager model of a preset, or an artifact folder of any
backend). Peers (one module each): ``transformers`` (hf_transformers.py), ``executorch-runner``
(executorch_runner.py), ``llama.cpp`` (llamacpp.py, GGUF from gguf_writer.py). Every side runs in
its own fresh worker process (``python -m sfedge.benchmarks.worker``); ``--rounds`` R runs ours,
peer(s), ours, peer(s), ... R times and pools the repetitions, because this machine drifts 10-20 %
within minutes."""
from __future__ import annotations

from typing import Callable

from sfedge.benchmarks.peers.executorch_runner import measure_executorch_runner
from sfedge.benchmarks.peers.hf_transformers import measure_transformers
from sfedge.benchmarks.peers.llamacpp import measure_llamacpp, prepare_gguf
from sfedge.benchmarks.peers.ours import measure_ours
from sfedge.registry import Registry

# worker job kind -> what the worker process runs (benchmarks/worker.py dispatches here)
JOBS: Registry[Callable[[dict], dict]] = Registry("peers job")
JOBS.add("llm", measure_ours)
JOBS.add("transformers", measure_transformers)
JOBS.add("executorch-runner", measure_executorch_runner)
JOBS.add("llama.cpp", measure_llamacpp)
JOBS.add("llama.cpp-gguf", prepare_gguf)
PEER_NAMES = ("transformers", "executorch-runner", "llama.cpp")


def handles(kind: str) -> bool:
    return kind in JOBS


def run_job(job: dict) -> dict:
    return JOBS.get(job["kind"])(job)


from sfedge.benchmarks.peers.cli import main  # noqa: E402  (``peers.main(argv)``; cli reads PEER_NAMES above)
