"""benchmarks/composition_cost.py on random tiny models: every variant composes, decodes with its caches, and is
reported; what each option adds in trainable parameters follows from the architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "composition_cost.py"


def test_composition_cost_script_reports_every_variant(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--threads", "1", "--context", "16", "--new-tokens", "4",
         "--json", str(tmp_path / "cost.json")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads((tmp_path / "cost.json").read_text())["rows"]}
    assert len(rows) == 6 and all(r["decode_s_per_token"] > 0 and r["prefill_s"] > 0 for r in rows.values())
    params = {name.split(",")[0].split(" (")[0]: row["trainable_params"] for name, row in rows.items()}
    separate, depth1, depth2 = (rows[n]["trainable_params"] for n in (
        "A + B, a bridge each (separate)", "A + B separate + 1 depth connection each",
        "A + B separate + 2 depth connections each"))
    assert separate < depth1 < depth2 and depth2 - depth1 == depth1 - separate  # each connection adds the same
    assert params["A only"] < separate and params["B only"] < separate
    assert "| A + B, one bridge (concat) |" in done.stdout
