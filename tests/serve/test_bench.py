"""`bench serve` against a real server: every request completes with exactly the asked-for
tokens, and the summary's figures are consistent."""

from __future__ import annotations

import json

import pytest

from tessera.serve.bench import format_table, main, random_prompts, run_bench

from .test_server_helpers import MODEL, Server, shared_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


def test_random_prompts_are_reproducible():
    first = random_prompts(3, 16, seed=1)
    assert first == random_prompts(3, 16, seed=1) != random_prompts(3, 16, seed=2)
    assert [len(p) for p in first] == [16, 16, 16]


def test_run_bench_counts_every_token(server):
    summary = run_bench(server.url, num_prompts=6, concurrency=3, input_len=32, output_len=5)
    assert summary["model"] == MODEL
    assert summary["num_completed"] == 6 and summary["num_failed"] == 0
    assert summary["total_output_tokens"] == 6 * 5
    assert summary["total_input_tokens"] == 6 * 32
    assert summary["output_throughput"] == pytest.approx(30 / summary["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        stats = summary[key]
        assert 0 < stats["p50"] <= stats["p99"], (key, stats)
    assert summary["ttft_ms"]["p99"] <= summary["e2e_latency_ms"]["p99"]
    assert "output throughput" in format_table(summary)


def test_command_line_writes_json(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["--url", server.url, "--num-prompts", "2", "--concurrency", "2",
                   "--input-len", "8", "--output-len", "3", "--out", str(out)])
    assert status == 0
    assert json.loads(out.read_text())["total_output_tokens"] == 6
    assert "TTFT" in capsys.readouterr().out


def test_unreachable_server_is_one_error_line(capsys):
    status = main(["--url", "http://127.0.0.1:9", "--num-prompts", "1"])
    assert status == 2
    assert capsys.readouterr().err.startswith("tessera: error: cannot list the models")
