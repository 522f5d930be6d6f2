"""Side by side with a peer on the same LLM: prefill N tokens, decode G, in the same run.

    python -m sfedge.benchmarks.peers --model tiny --prompt-tokens 128 --gen-tokens 32
    python -m sfedge.benchmarks.peers out/tiny_executorch_8da4w --threads 2
    python -m sfedge.benchmarks.peers out/sf1b_et_8da4w --peer executorch-runner --prompt-tokens 100 --gen-tokens 64

Ours runs through the runtime (the eager model of a preset, or an artifact folder of any backend).
Peers:

- ``transformers``: transformers' Qwen2ForCausalLM built from a Qwen2Config with the preset's LLM
  shape and random init (fp32, sdpa attention, dynamic cache, logits of the last position only).
- ``executorch-runner``: ExecuTorch's own C++ LLM runner (``executorch.extension.llm.runner.
  MultimodalRunner``) on the *same* ``llm.pte`` and ``tokenizer.json`` of an executorch artifact
  folder, fed the same token ids (``make_token_input``), greedy. Its PyTorchObserver stats give the
  rates (decode = generated tokens / (inference end - prompt eval end), ExecuTorch's formula). The
  runner prefills the prompt in one call, so the prompt must fit the exported prefill chunk.

Each side runs in its own fresh worker process, alternating, in the same run (this machine drifts
10-20 % within minutes). For a preset, ours builds the LLM with the tiny preset's vision encoder, so
RSS compares the LLMs only; an artifact folder loads all its components. llama.cpp is not installed
here, so there is no llama.cpp peer (see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Optional, Sequence

from sfedge.errors import SfedgeError, UsageError
from sfedge.runtime.stats import peak_rss_bytes


def _config_of(job: dict):
    from sfedge.config import ModelConfig, get_preset
    from sfedge.manifest import read_manifest

    source = job["source"]
    if source.get("folder"):
        return ModelConfig.from_dict(read_manifest(source["folder"]).model_config)
    return get_preset(source["preset"])


def _token_ids(vocab: int, count: int, seed: int):
    import torch

    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed))


def _measure(prefill_fn, step_fn, job: dict) -> dict:
    """prefill_fn() -> logits; step_fn(token, position) -> logits; returns samples + summaries."""
    from sfedge.benchmarks.summary import summarize_all

    prompt, gen = job["prompt_tokens"], job["gen_tokens"]
    samples: dict = {"prefill_ms": [], "prefill_tokens_per_s": [], "decode_tokens_per_s": []}
    for rep in range(job["warmup"] + job["repetitions"]):
        start = time.perf_counter_ns()
        logits = prefill_fn()
        prefill_ns = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        for step in range(gen - 1):
            logits = step_fn(int(logits.argmax()), prompt + step)
        decode_s = (time.perf_counter_ns() - start) / 1e9
        if rep >= job["warmup"]:
            samples["prefill_ms"].append(prefill_ns / 1e6)
            samples["prefill_tokens_per_s"].append(prompt / (prefill_ns / 1e9))
            samples["decode_tokens_per_s"].append((gen - 1) / decode_s if decode_s else 0.0)
    return {"metrics": summarize_all(samples), "samples": samples, "peak_rss_bytes": peak_rss_bytes()}


def measure_ours(job: dict) -> dict:
    import torch

    from sfedge.runtime.generate import prefill
    from sfedge.runtime.pipeline import Pipeline
    from sfedge.runtime.sessions import SessionOptions

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    source = job["source"]
    start = time.perf_counter_ns()
    if source.get("folder"):
        pipeline = Pipeline.from_folder(source["folder"], SessionOptions(verify=job["verify"], threads=job.get("threads")),
                                        source.get("backend"))
    else:
        from sfedge.config import get_preset
        from sfedge.models import WeightsSource

        tiny = get_preset("tiny")
        config = get_preset(source["preset"]).replace(vision=tiny.vision, slowfast=tiny.slowfast)  # the LLM only matters
        pipeline = Pipeline.from_preset(config, WeightsSource(seed=job["seed"]),
                                        job["prompt_tokens"] + job["gen_tokens"] + 16)
    load_ms = (time.perf_counter_ns() - start) / 1e6
    session = pipeline.session
    if job["prompt_tokens"] + job["gen_tokens"] > session.max_context:
        raise SfedgeError(f"{job['prompt_tokens']} + {job['gen_tokens']} tokens do not fit the context of {session.max_context}")
    embeds = session.embed(_token_ids(session.config.llm.vocab_size, job["prompt_tokens"], job["seed"]))

    def prefill_fn():
        session.reset()
        return prefill(session, embeds)

    def step_fn(token: int, position: int):
        return session.decode(session.embed(torch.tensor([token], dtype=torch.long)), position)

    result = _measure(prefill_fn, step_fn, job)
    return {**result, "name": f"sfedge {session.backend}", "model_load_ms": load_ms, "threads": torch.get_num_threads()}


def qwen2_config(llm):
    import transformers

    if llm.hidden != llm.heads * llm.head_dim:
        raise SfedgeError(f"transformers' Qwen2 needs hidden = heads x head_dim (got {llm.hidden} vs {llm.heads} x {llm.head_dim})")
    return transformers.Qwen2Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.intermediate,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
        max_position_embeddings=llm.max_context, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=llm.tie_embeddings, attn_implementation="sdpa")


def measure_transformers(job: dict) -> dict:
    import torch

    try:
        import transformers
    except ModuleNotFoundError:
        raise SfedgeError("the transformers peer needs transformers: pip install 'sfedge[dev]'") from None
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    llm = _config_of(job).llm
    start = time.perf_counter_ns()
    torch.manual_seed(job["seed"])
    model = transformers.Qwen2ForCausalLM(qwen2_config(llm)).eval()
    load_ms = (time.perf_counter_ns() - start) / 1e6
    ids = _token_ids(llm.vocab_size, job["prompt_tokens"], job["seed"])[None]
    state: dict = {}

    @torch.inference_mode()
    def prefill_fn():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    @torch.inference_mode()
    def step_fn(token: int, position: int):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=state["past"], use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    result = _measure(prefill_fn, step_fn, job)
    return {**result, "name": f"transformers {transformers.__version__}", "model_load_ms": load_ms,
            "threads": torch.get_num_threads()}


def check_executorch_runner_job(job: dict):
    """The runner needs an executorch folder and a prompt within one prefill call; returns (manifest, decoder entry)."""
    from sfedge.manifest import Component, read_manifest

    folder = job["source"].get("folder")
    manifest = read_manifest(folder) if folder else None
    if manifest is None or manifest.backend != "executorch":
        raise UsageError("the executorch-runner peer needs an executorch artifact folder (it runs that folder's llm.pte)")
    decoder = manifest.component(Component.TEXT_DECODER)
    if job["prompt_tokens"] > int(decoder.extra["prefill_chunk"]):
        raise UsageError(f"ExecuTorch's runner prefills in one call: --prompt-tokens must be <= the exported prefill chunk "
                         f"({decoder.extra['prefill_chunk']})")
    return manifest, decoder


def measure_executorch_runner(job: dict) -> dict:
    from importlib import metadata
    from pathlib import Path

    from sfedge.benchmarks.summary import summarize_all
    from sfedge.manifest import TOKENIZER_FILE

    folder = job["source"]["folder"]
    manifest, decoder = check_executorch_runner_job(job)
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama.custom_sdpa / update_cache kernels)
        from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_token_input
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    except ModuleNotFoundError as exc:
        raise SfedgeError(f"the executorch-runner peer needs {exc.name}: pip install 'sfedge[executorch]'") from None
    if any(entry.extra.get("quantized_kernels") for entry in manifest.components):
        import executorch.kernels.quantized  # noqa: F401
    if job.get("threads"):
        _unsafe_reset_threadpool(int(job["threads"]))
    start = time.perf_counter_ns()
    runner = MultimodalRunner(str(Path(folder) / decoder.file), str(Path(folder) / TOKENIZER_FILE))
    load_ms = (time.perf_counter_ns() - start) / 1e6
    ids = [int(i) for i in _token_ids(manifest.model_config["llm"]["vocab_size"], job["prompt_tokens"], job["seed"])]
    samples: dict = {"prefill_ms": [], "prefill_tokens_per_s": [], "decode_tokens_per_s": []}
    for rep in range(job["warmup"] + job["repetitions"]):
        stats: list = []
        runner.reset()
        runner.generate([make_token_input(ids)], GenerationConfig(max_new_tokens=job["gen_tokens"], temperature=0.0, echo=False),
                        token_callback=lambda text: None, stats_callback=lambda s: stats.append(json.loads(s.to_json_string())))
        if not stats:
            raise SfedgeError("ExecuTorch's runner reported no stats")
        st = stats[-1]
        prefill_ms = st["prompt_eval_end_ms"] - st["inference_start_ms"]
        decode_ms = st["inference_end_ms"] - st["prompt_eval_end_ms"]
        if st["prompt_tokens"] != job["prompt_tokens"]:
            raise SfedgeError(f"ExecuTorch's runner saw {st['prompt_tokens']} prompt tokens, expected {job['prompt_tokens']}")
        if rep >= job["warmup"]:
            samples["prefill_ms"].append(prefill_ms)
            samples["prefill_tokens_per_s"].append(st["prompt_tokens"] / (prefill_ms / 1e3) if prefill_ms else 0.0)
            samples["decode_tokens_per_s"].append(st["generated_tokens"] / (decode_ms / 1e3) if decode_ms else 0.0)
    return {"metrics": summarize_all(samples), "samples": samples, "peak_rss_bytes": peak_rss_bytes(),
            "name": f"ExecuTorch {metadata.version('executorch')} runner", "model_load_ms": load_ms,
            "threads": job.get("threads")}


PEERS = {"transformers": measure_transformers, "executorch-runner": measure_executorch_runner}


def run_job(job: dict) -> dict:
    return measure_ours(job) if job["kind"] == "llm" else PEERS[job["kind"]](job)


# --- command line --------------------------------------------------------------------------------------

def format_table(ours: dict, peer: dict, job: dict) -> str:
    mean = lambda r, m: r["metrics"][m]["mean"]  # noqa: E731
    rows = [(f"prefill {job['prompt_tokens']} tok, tok/s", mean(ours, "prefill_tokens_per_s"), mean(peer, "prefill_tokens_per_s")),
            (f"decode {job['gen_tokens']} tok, tok/s", mean(ours, "decode_tokens_per_s"), mean(peer, "decode_tokens_per_s")),
            ("peak RSS, MiB", ours["peak_rss_bytes"] / 2**20, peer["peak_rss_bytes"] / 2**20),
            ("load / build, ms", ours["model_load_ms"], peer["model_load_ms"])]
    lines = [f"| metric | {ours['name']} | {peer['name']} | ours / peer |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:,.1f} | {b:,.1f} | {a / b if b else float('nan'):.2f}x |" for name, a, b in rows]
    return "\n".join(lines)


_NATIVE_LOG = re.compile(r"^(\[\w+\.(cpp|h):\d+\]|[IWE]\d{4} |[IWE] )")  # [op.cpp:12] ..., glog/absl, tokenizers


def _quiet_progress(line: str) -> None:
    """Forward the worker's own lines; drop the C++ libraries' log lines."""
    if not _NATIVE_LOG.match(line):
        print(line, file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sfedge.benchmarks.cases import Source
    from sfedge.benchmarks.runner import spawn_worker

    parser = argparse.ArgumentParser(prog="python -m sfedge.benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="?", metavar="DIR", help="artifact folder (default: the eager model of --model)")
    parser.add_argument("--model", default="tiny", help="preset whose LLM shape both sides use (default: tiny)")
    parser.add_argument("--backend", help="with DIR: run this backend on it, e.g. eager")
    parser.add_argument("--peer", choices=sorted(PEERS), default="transformers", help="what to compare with")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write both results as JSON")
    args = parser.parse_args(argv)
    try:
        if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repetitions < 1:
            raise UsageError("--prompt-tokens >= 1, --gen-tokens >= 2 and --repetitions >= 1 are required")
        source = Source(folder=args.artifacts, backend=args.backend) if args.artifacts else Source(preset=args.model)
        job = {"source": source.__dict__, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
               "threads": args.threads, "repetitions": args.repetitions, "warmup": args.warmup, "seed": args.seed,
               "verify": True}
        if args.peer == "executorch-runner":
            check_executorch_runner_job(job)
        results = {}
        for kind in ("llm", args.peer):
            print(f"{kind}: warm-up {args.warmup} + {args.repetitions} repetitions ...", file=sys.stderr)
            results[kind] = spawn_worker({**job, "kind": kind}, progress=_quiet_progress)
            if results[kind].get("status") == "failed":
                raise SfedgeError(f"{kind}: {results[kind]['note']}")
    except SfedgeError as exc:
        print(f"peers: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print(format_table(results["llm"], results[args.peer], job))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"job": job, **results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
