"""`streamvlm bench memory` as a user runs it, and its byte-size parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamvlm.config import parse_size
from streamvlm.errors import ConfigError

SUMMARY_KEYS = {
    "max_working_bytes", "budget_bytes", "rss_growth_ratio", "retrieval_s", "frames_per_working_mb",
    "uncompressed_frames_per_working_mb", "store_ram_bytes", "store_disk_bytes", "chunks_stored", "chunks_dropped",
}
SAMPLE_KEYS = {"frame", "working_bytes", "working_tokens", "store_ram_bytes", "store_disk_bytes", "rss_bytes"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("100000", 100000),
        ("0", 0),
        ("512MB", 512 * 2**20),
        ("2GB", 2 * 2**30),
        ("2gb", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("64k", 64 * 2**10),
        (" 10 MB ", 10 * 2**20),
        ("7B", 7),
    ],
)
def test_parse_size_accepts_bytes_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-1", "12XB", "1.2.3GB", "two GB", "5 M B"])
def test_parse_size_rejects_bad_input_with_config_error(text):
    with pytest.raises(ConfigError, match="--store-ram .*expected a size"):
        parse_size(text, what="--store-ram")


def test_bench_memory_cli_rejects_bad_size():
    proc = subprocess.run(
        [sys.executable, "-m", "streamvlm.cli", "bench", "memory", "--model", "tiny-smolvlm", "--frames", "2", "--store-ram", "lots"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert proc.returncode == 2
    assert "--store-ram 'lots'" in proc.stderr


def test_bench_memory_writes_the_documented_json(tmp_path):
    out = tmp_path / "mem.json"
    args = ["bench", "memory", "--model", "tiny-smolvlm", "--frames", "40", "--policy", "window", "--budget", "300",
            "--sample-every", "10", "--json", str(out), "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "streamvlm.cli", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert {"benchmark", "model", "policy", "frames", "budget_tokens", "samples", "summary"} <= set(result)
    assert (result["benchmark"], result["model"], result["policy"], result["frames"], result["budget_tokens"]) == (
        "memory", "tiny-smolvlm", "window", 40, 300,
    )
    summary = result["summary"]
    assert SUMMARY_KEYS <= set(summary)
    samples = result["samples"]
    assert [s["frame"] for s in samples] == [10, 20, 30, 40]
    for s in samples:
        assert SAMPLE_KEYS <= set(s)
        assert 0 < s["working_bytes"] <= summary["budget_bytes"]
        assert 0 < s["working_tokens"] <= 300
        assert s["rss_bytes"] > 0
    assert summary["max_working_bytes"] <= summary["budget_bytes"]
    assert summary["chunks_stored"] > 0 and summary["store_ram_bytes"] > 0
    assert summary["retrieval_s"] > 0
    assert summary["rss_growth_ratio"] > 0
    # 40 frames in a bounded working memory stand for more frames per MiB than an uncompressed cache.
    assert summary["frames_per_working_mb"] > summary["uncompressed_frames_per_working_mb"] > 0


def test_plot_and_retrieval_bench(tmp_path):
    from streamvlm.bench.plot import plot_memory_samples
    from streamvlm.bench.retrieval import run_retrieval_bench

    samples = [{"frame": f, "working_bytes": 1000 + f, "store_ram_bytes": 10 * f + 1, "store_disk_bytes": 0, "rss_bytes": 2**28} for f in (10, 20, 30)]
    out = plot_memory_samples({"samples": samples, "model": "m", "policy": "window", "budget_tokens": 300}, tmp_path / "p.png")
    import cv2

    img = cv2.imread(str(out))
    assert img is not None and img.shape == (520, 900, 3) and (img < 250).any()
    result = run_retrieval_bench(200, layers=2, kv_heads=1, q_heads=2, head_dim=8, chunk_tokens=4, question_tokens=3, repeats=3)
    assert result["chunks"] == 200 and result["search_s"] > 0 and result["fetch_top_k_disk_s"] > 0
