"""`pdserve up` refuses a bad emulation setup before it starts anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROFILE = os.path.join(ROOT, "profiles", "llama-3-8b-H100-80G-analytic.json")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--emulate", "/nonexistent/profile.json"], "--emulate: "),
        (["--emulate", os.path.join(ROOT, "README.md")], "--emulate: "),  # not JSON
        (["--prefill-profile", PROFILE], "--prefill-profile and --decode-profile go together"),
    ],
)
def test_a_bad_emulation_setup_is_refused_up_front(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--port", "0", "--log-dir", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # no service was started (none wrote a log)
