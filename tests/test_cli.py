"""The sfedge command, called in-process: output, exit codes, one-line errors."""
import json

import pytest

from sfedge.cli import main
from sfedge.config import get_preset
from sfedge.prompt import tokenize_prompt
from sfedge.tokenizer import load_tokenizer


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_presets_lists_every_preset(capsys):
    code, out, _ = run_cli(capsys, "presets", "--json")
    rows = {r["preset"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"sf-llava-1.5-1b", "sf-llava-1.5-3b", "sf-llava-1.5-7b", "tiny"}
    assert rows["sf-llava-1.5-1b"]["total"] > rows["tiny"]["total"]


def test_budget_json_keys_and_figures(capsys):
    code, out, _ = run_cli(capsys, "budget", "--model", "sf-llava-1.5-1b", "--frames", "128", "--json")
    budget = json.loads(out)
    assert code == 0
    assert {"frames", "slow_frames", "slow_tokens", "fast_tokens", "visual_tokens", "kv_cache_bytes"} <= set(budget)
    assert budget["visual_tokens"] == 9216 and budget["text_tokens"] > 10 and budget["fits_context"]
    code, out, _ = run_cli(capsys, "budget", "--model", "sf-llava-1.5-1b", "--frames", "50", "--slowfast",
                           "slowfast-slow_10frms_spatial_1d_max_pool-fast_4x4", "--json")
    assert json.loads(out)["visual_tokens"] == 3680


def test_budget_reports_when_it_does_not_fit(capsys):
    code, out, _ = run_cli(capsys, "budget", "--model", "sf-llava-1.5-1b", "--frames", "1024")
    assert code == 0 and "DOES NOT FIT" in out


def test_run_eager_tiny_streams_tokens_and_timings(capsys, demo_video, tmp_path):
    stats_file = tmp_path / "stats.json"
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--video", str(demo_video), "--prompt",
                             "What happens in the video?", "--max-new-tokens", "8", "--temperature", "0.9",
                             "--sample-seed", "1", "--stats-json", str(stats_file))
    assert code == 0
    stats = json.loads(stats_file.read_text())
    assert stats["frames"] == 8 and stats["visual_tokens"] == 40 and stats["num_generated_tokens"] >= 1
    assert stats["num_prompt_tokens"] == 40 + len(tokenize_prompt(load_tokenizer(get_preset("tiny")), "What happens in the video?").before) + \
        len(tokenize_prompt(load_tokenizer(get_preset("tiny")), "What happens in the video?").after)
    assert "video decode" in err and "prefill" in err and "tok/s" in err and len(out) > 1  # text + newline


def test_run_greedy_is_deterministic(capsys, demo_video):
    argv = ["run", "--model", "tiny", "--video", str(demo_video), "--prompt", "Describe it.", "--max-new-tokens", "6"]
    _, first, _ = run_cli(capsys, *argv)
    _, second, _ = run_cli(capsys, *argv)
    assert first == second


@pytest.mark.parametrize("argv,code,message", [
    (["run", "--model", "sf-llava-9b", "--video", "x.mp4", "--prompt", "hi"], 2, "unknown model preset 'sf-llava-9b'"),
    (["run", "--model", "tiny", "--video", "MISSING.mp4", "--prompt", "hi"], 1, "MISSING.mp4 does not exist"),
    (["budget", "--model", "tiny", "--slowfast", "slowfast-fast"], 2, "malformed SlowFast spec"),
    (["run", "--model", "tiny", "--video", "x.mp4", "--prompt", "hi", "--top-p", "0"], 2, "--top-p"),
    (["parity", "NOT_A_FOLDER"], 1, "not an artifact folder"),
    (["nonsense"], 2, "invalid choice"),
])
def test_bad_input_is_a_one_line_error(capsys, argv, code, message):
    got, _, err = run_cli(capsys, *argv)
    assert got == code
    assert message in err
    if got == 1 or "unknown model" in message or "malformed" in message:
        assert len(err.strip().splitlines()) == 1


def test_prompt_over_context_is_a_clear_error(capsys, demo_video):
    code, _, err = run_cli(capsys, "run", "--model", "tiny", "--video", str(demo_video), "--prompt", "hi",
                           "--max-context", "50")
    assert code == 1 and "context holds 50" in err and "--frames" in err


def test_non_video_file_is_a_clear_error(capsys, tmp_path):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("plain text, not a video\n" * 40)
    code, _, err = run_cli(capsys, "run", "--model", "tiny", "--video", str(bogus), "--prompt", "hi")
    assert code == 1 and str(bogus) in err and len(err.strip().splitlines()) == 1


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert main(["run", "--help"]) == 0


def test_export_frame_list_parsing():
    import argparse

    from sfedge.cli.common import frame_list

    assert frame_list("8,32,128") == [8, 32, 128] and frame_list("16") == [16]
    for bad in ("8,x", "0,8", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            frame_list(bad)
