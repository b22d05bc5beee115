"""Long life, the short version for CI: ``bench/soak.py`` runs one executor process
through some hundreds of requests and must find its RSS and open descriptors flat after
the warm-up and no request failed (the full run, 100 000 requests, is ``make soak``).

The bounds are the soak's own defaults (40 MiB, 8 descriptors): a leak of a descriptor
per request, or of a stream's buffers per request, crosses them within this run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_an_executor_serves_hundreds_of_requests_with_flat_memory_and_descriptors(
    tmp_path,
):
    record = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--requests", "600", "--warmup", "200", "--every", "2", "--json", str(record)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PASS: flat" in run.stdout
    facts = json.loads(record.read_text())
    assert facts["requests"] == 600 and facts["failed"] == []
    assert len(facts["samples"]) >= 3  # the start, the baseline, the end at least
    assert facts["rss_growth_mib"] <= 40 and facts["fd_growth"] <= 8
