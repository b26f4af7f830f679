"""No tracked file keeps a merge's conflict markers (a README once shipped with both sides of one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_tracked_file_holds_conflict_markers() -> None:
    # git grep exits 1 when nothing matches; the markers are 7 characters at the start of a line
    found = subprocess.run(
        ["git", "grep", "-n", "-I", "-E", r"^(<<<<<<<|>>>>>>>)( |$)|^=======$"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert found.returncode == 1, found.stdout or found.stderr
