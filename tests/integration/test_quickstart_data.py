"""scripts/make_quickstart_data.py, run as a script, writes exactly the shipped recipes/data/quickstart.jsonl."""

from __future__ import annotations


def test_quickstart_data_is_generated_deterministically(repo_root, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "q.jsonl"
    subprocess.run([sys.executable, str(repo_root / "scripts" / "make_quickstart_data.py"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes() == (repo_root / "recipes" / "data" / "quickstart.jsonl").read_bytes()
