"""bench/bench_gpu.py --dry-run: the GPU benchmark's code runs end to end on the CPU with the tiny configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_dry_run(tmp_path, golden_dir):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "LFM2AUDIO_GOLDEN": str(golden_dir)}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry-run", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sessions | eager ms/step |" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["sessions"] for r in result["steps"]] == [1, 2]
    assert result["single_session"]["frames"] > 0
    assert result["max_real_time_sessions"] >= 0
