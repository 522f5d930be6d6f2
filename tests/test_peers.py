"""Peers and limits: the GGUF of our weights, llama.cpp on it (when installed), the SIGILL hint, the
runner peer's byte decoding, the bandwidth probe's sizing, CPU flags in every table."""
from __future__ import annotations

import os
import signal
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sfedge.errors import SfedgeError

gguf = pytest.importorskip("gguf", reason="the GGUF writer needs the gguf package (pinned in [dev] and [llamacpp])")

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA_CPP = True
except ModuleNotFoundError:
    HAVE_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed: it builds from "
                                     "source for minutes, so it is the optional [llamacpp] extra, not part of [dev]")


# --- the GGUF writer ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from sfedge.benchmarks.gguf_writer import write_gguf
    from sfedge.config import get_preset

    path = tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf"
    return write_gguf(str(path), get_preset("tiny").llm, seed=0)


def test_gguf_of_tiny_has_qwen2_shapes_and_our_weights(tiny_gguf, tiny_config, tiny_model):
    from sfedge.benchmarks.gguf_writer import expected_shapes, read_tensor_shapes

    llm = tiny_config.llm
    shapes = read_tensor_shapes(tiny_gguf.path)
    expected = expected_shapes(llm)
    assert set(shapes) == set(expected)  # tied embeddings: no output.weight
    assert {name: shape for name, (shape, _) in shapes.items()} == expected
    assert {kind for _, kind in shapes.values()} == {"F32"}
    reader = gguf.GGUFReader(tiny_gguf.path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "qwen2"
    assert fields["qwen2.block_count"] == llm.layers and fields["qwen2.attention.head_count_kv"] == llm.kv_heads
    assert fields["qwen2.rope.freq_base"] == llm.rope_theta
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == llm.vocab_size == len(set(tokens))
    assert all(tokens[token_id] == text for text, token_id in llm.special_tokens)
    data = {t.name: np.asarray(t.data) for t in reader.tensors}  # the very tensors build_model(seed=0) makes
    np.testing.assert_array_equal(data["token_embd.weight"], tiny_model.token_embedding.embed_tokens.weight.detach().numpy())
    layer = tiny_model.text_decoder.layers[1]
    np.testing.assert_array_equal(data["blk.1.attn_k.bias"], layer.self_attn.k_proj.bias.detach().numpy())
    np.testing.assert_array_equal(data["blk.1.ffn_down.weight"], layer.mlp.down_proj.weight.detach().numpy())


def test_gguf_writer_rejects_a_shape_llama_cpp_cannot_run(tmp_path, tiny_config):
    import dataclasses

    from sfedge.benchmarks.gguf_writer import write_gguf

    odd = dataclasses.replace(tiny_config.llm, head_dim=8)
    with pytest.raises(SfedgeError, match="hidden = heads x head_dim"):
        write_gguf(str(tmp_path / "x.gguf"), odd)
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_llama_cpp_runs_our_gguf_with_our_logits(tiny_gguf, tiny_model, tiny_config):
    """llama.cpp loads the F32 GGUF and computes the logits our eager decoder computes (so the file
    is the same model), then decodes 2 more tokens."""
    import llama_cpp

    from sfedge.benchmarks.peers.llamacpp import _quiet_logs

    _quiet_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(tiny_gguf.path.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 64, 1, 1
    params.type_k = params.type_v = 0  # GGML_TYPE_F32 KV cache: compare fp32 with fp32
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU path rounds Q to fp16: 7e-3 off
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = tiny_config.llm.vocab_size
    ids = [5, 17, 300, 42, 7, 99]
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(ids))) == 0
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,)).copy()
    with torch.no_grad():
        tiny_model.text_decoder.reset_cache()
        ours = tiny_model.text_decoder(tiny_model.token_embedding(torch.tensor([ids])), torch.tensor([0]))[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-3, rtol=1e-3)
    for _ in range(2):
        one = (llama_cpp.llama_token * 1)(int(theirs.argmax()))
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
        theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,)).copy()
        assert np.isfinite(theirs).all()
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


@needs_llama_cpp
@pytest.mark.slow
def test_llama_cpp_peer_side_by_side_on_tiny(tmp_path, capsys):
    from sfedge.benchmarks import peers

    argv = ["--model", "tiny", "--peer", "llama.cpp", "--quant", "Q4_0,Q8_0", "--prompt-tokens", "12", "--gen-tokens", "3",
            "-r", "1", "--warmup", "0", "--rounds", "1", "--threads", "1", "--gguf-dir", str(tmp_path)]
    assert peers.main(argv) == 0
    out = capsys.readouterr().out
    assert "| sfedge eager fp32 | llama.cpp Q4_0 | llama.cpp Q8_0 | ours / llama.cpp Q4_0 |" in out
    assert "CPU flags:" in out and "GGUF tensor types" in out
    folder = next(tmp_path.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["Q4_0.gguf", "Q8_0.gguf"]  # the F32 source is removed
    from sfedge.benchmarks.gguf_writer import read_tensor_shapes

    assert read_tensor_shapes(str(folder / "Q4_0.gguf"))["blk.0.ffn_up.weight"][1] == "Q4_0"


# --- SIGILL from a llama.cpp build that uses instructions the VM forbids ------------------------------------

def test_sigill_in_a_worker_becomes_the_rebuild_hint(tmp_path, monkeypatch):
    from sfedge.benchmarks import runner
    from sfedge.benchmarks.peers.llamacpp import check_worker_result

    (tmp_path / "sigill_worker.py").write_text(textwrap.dedent("""
        import os, signal, sys
        sys.stdin.read()
        os.kill(os.getpid(), signal.SIGILL)
    """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = runner.spawn_worker({"kind": "llama.cpp"}, progress=lambda line: None, module="sigill_worker")
    assert result["status"] == "failed" and result["returncode"] == -signal.SIGILL
    with pytest.raises(SfedgeError, match=r"forbids \(SIGILL\): rebuild with CMAKE_ARGS=\"-DGGML_NATIVE=OFF") as info:
        check_worker_result(result, "llama.cpp")
    assert "-DGGML_AMX_INT8=OFF" in str(info.value)
    with pytest.raises(SfedgeError, match="llama.cpp: worker exited with code 3"):
        check_worker_result({"status": "failed", "returncode": 3, "note": "worker exited with code 3"}, "llama.cpp")


def test_safe_cmake_args_follow_the_cpu_flags():
    from sfedge.benchmarks.peers.llamacpp import safe_cmake_args

    avx512 = safe_cmake_args(["avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"])
    assert "-DGGML_AVX512=ON" in avx512 and "-DGGML_AVX512_VNNI=ON" in avx512 and "-DGGML_AMX_TILE=OFF" in avx512
    assert "AMX_INT8=ON" not in avx512 and "-DGGML_NATIVE=OFF" in avx512
    avx2 = safe_cmake_args(["avx", "avx2", "fma", "f16c"])
    assert "-DGGML_AVX2=ON" in avx2 and "AVX512" not in avx2


# --- the ExecuTorch runner's generated bytes ---------------------------------------------------------

def test_utf8_pieces_reassemble_a_character_cut_between_tokens():
    from sfedge.benchmarks.peers.executorch_runner import Utf8Pieces

    data = "a视频b".encode()  # 视 and 频: 3 bytes each
    pieces = Utf8Pieces()
    assert [pieces.feed(data[:2]), pieces.feed(data[2:3]), pieces.feed(data[3:5]), pieces.feed(data[5:])] == ["a", "", "视", "频b"]
    assert pieces.finish() == "a视频b"
    cut = Utf8Pieces()
    cut.feed(b"ok \xe8\xa7")  # the stream ends mid-character, and an invalid byte on the way
    cut.feed(b"\xff!")
    assert cut.finish() == "ok \ufffd\ufffd!"
    with pytest.raises(UnicodeDecodeError):
        data[:2].decode()  # what the binding did per piece


def test_native_stdout_is_captured_as_bytes_and_decoded():
    """The runner prints raw piece bytes on file descriptor 1; we read them back, not via str."""
    from sfedge.benchmarks.peers.executorch_runner import decode_stream, native_stdout_to

    with tempfile.TemporaryFile() as sink:
        with native_stdout_to(sink):
            for piece in (b"x\xe8", b"\xa7\x86", b"\xe9"):  # 视 cut across two writes, then a dangling lead byte
                os.write(1, piece)
        text = decode_stream(sink, chunk_bytes=1)
    assert text == "x视\ufffd"


# --- limits: the bandwidth probe past the last-level cache ---------------------------------------------

def _fake_cache(root: Path, caches) -> str:
    for index, (level, kind, size) in enumerate(caches):
        folder = root / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    return str(root)


def test_bandwidth_probe_is_sized_past_the_last_level_cache(tmp_path):
    from sfedge.benchmarks.limits import MAX_PROBE_BYTES, MIN_PROBE_BYTES, bandwidth_probe_bytes, last_level_cache_bytes

    xeon = _fake_cache(tmp_path / "xeon", [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                          (3, "Unified", "307200K")])
    assert last_level_cache_bytes(xeon) == 300 * 2**20
    assert bandwidth_probe_bytes(300 * 2**20) == 1200 * 2**20
    laptop = _fake_cache(tmp_path / "laptop", [(1, "Data", "32K"), (2, "Unified", "1M"), (3, "Unified", "16M")])
    assert last_level_cache_bytes(laptop) == 16 * 2**20
    assert bandwidth_probe_bytes(16 * 2**20) == MIN_PROBE_BYTES  # 4 x 16 MiB is below the floor
    assert bandwidth_probe_bytes(1 << 30) == MAX_PROBE_BYTES  # a huge LLC: capped, still 2x past it
    assert last_level_cache_bytes(str(tmp_path / "missing")) is None
    assert bandwidth_probe_bytes(None) == MIN_PROBE_BYTES
    big_instruction = _fake_cache(tmp_path / "odd", [(2, "Unified", "1024K"), (3, "Instruction", "64M")])
    assert last_level_cache_bytes(big_instruction) == 2**20  # instruction caches do not count


def test_limits_report_the_probe_and_the_cache(tmp_path, monkeypatch):
    from sfedge.benchmarks import limits

    monkeypatch.setattr(limits, "MIN_PROBE_BYTES", 8 * 2**20)
    cache = _fake_cache(tmp_path, [(3, "Unified", "2M")])
    result = limits.measure_limits(repeats=1, cache_dir=cache)
    assert result.llc_bytes == 2 * 2**20 and result.probe_bytes == 8 * 2**20
    assert result.read_gb_s > 0 and result.copy_gb_s > 0


# --- provenance: CPU flags in every table ---------------------------------------------------------------

def test_cpu_flags_keep_the_kernel_relevant_ones(tmp_path):
    from sfedge.benchmarks.provenance import cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni "
                       "avx_vnni amx_tile amx_int8 ht syscall\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(cpuinfo)) == ["amx_int8", "amx_tile", "avx", "avx2", "avx512_vnni", "avx512f", "avx_vnni", "fma", "sse4_2"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm crc32\n")
    assert cpu_flags(str(arm)) == ["asimd", "asimddp", "i8mm"]
    assert cpu_flags(str(tmp_path / "none")) == []


def test_bench_table_prints_cpu_flags_and_the_probe():
    from sfedge.benchmarks.printers import flat_row, print_markdown

    prov = {"cpu": "Xeon", "cpu_flags": ["avx2", "avx512_vnni"], "libraries": {}}
    limit = {"threads": 2, "read_gb_s": 17.8, "copy_gb_s": 12.0, "matmul_gflop_s": 211.0, "probe_bytes": 1200 * 2**20,
             "llc_bytes": 300 * 2**20}
    document = {"results": [], "provenance": prov, "limits": {"2": limit}}
    text = print_markdown(document)
    assert "- CPU flags: avx2 avx512_vnni" in text
    assert "read 17.8 GB/s" in text and "(probe 1200 MiB, LLC 300 MiB)" in text
    assert flat_row({"provenance": prov})["cpu_flags"] == "avx2 avx512_vnni"


# --- pooling the alternating rounds -----------------------------------------------------------------------

def test_rounds_pool_into_one_result_and_the_table_shows_ratios():
    from sfedge.benchmarks.peers.cli import OURS, format_table, pool
    from sfedge.benchmarks.summary import summarize_all

    def result(name, prefill, decode, rss):
        samples = {"prefill_ms": [1000 * 100 / p for p in prefill], "prefill_tokens_per_s": prefill,
                   "decode_tokens_per_s": decode}
        return {"name": name, "samples": samples, "metrics": summarize_all(samples), "peak_rss_bytes": rss,
                "model_load_ms": 100.0}

    ours = pool([result("ours", [100, 120], [10, 10], 2**30), result("ours", [140], [13], 2**29)])
    assert ours["metrics"]["prefill_tokens_per_s"]["n"] == 3 and ours["metrics"]["prefill_tokens_per_s"]["mean"] == 120
    assert ours["peak_rss_bytes"] == 2**30 and len(ours["round_means"]) == 2
    peer = pool([result("llama.cpp Q4_0", [60], [11], 2**29)])
    table = format_table({OURS: ours, "llama.cpp Q4_0": peer}, 100, 32)
    assert "| prompt 100, gen 32 | ours | llama.cpp Q4_0 | ours / llama.cpp Q4_0 |" in table
    assert "| 2.00x |" in table  # prefill 120 vs 60
    assert "1.00x" in table  # decode 11 vs 11
