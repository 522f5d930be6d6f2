"""sfedge benchmarks (``sfedge bench``): cases and sweeps (cases.py), one case per fresh worker
process (worker.py, runner.py), machine limits and rooflines (limits.py, roofline.py), printers,
plots, the CI regression gate (gate.py) and the peers (peers/: transformers, ExecuTorch's runner,
llama.cpp on a GGUF written by gguf_writer.py).
Only the runtime is used, so every backend is measured by the same code."""
