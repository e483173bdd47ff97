"""No silent skips: the suite's own conftest run on tiny test files, in a pytest subprocess.

Under ``CI=true`` a missing peer fails its test and any other skip fails the run (exit 1);
locally both skip, and every run ends with the summary of skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CASES = {
    "plain_skip": "import pytest\n\ndef test_x():\n    pytest.skip('no reason given')\n",
    "missing_tool": (
        "import services\n\ndef test_x():\n    services.require_tool('no-such-peer-tool', 'no-such-package')\n"
    ),
    "missing_root_mark": (
        "import services\n\n@services.needs(False, 'a privilege this host lacks')\ndef test_x():\n    pass\n"
    ),
    "all_pass": "import services\n\ndef test_x():\n    assert services.require_tool('sh')\n",
}


def _run(tmp_path: Path, case: str, ci: bool) -> subprocess.CompletedProcess[str]:
    test = tmp_path / f"test_{case}.py"
    test.write_text(CASES[case])
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if ci:
        env["CI"] = "true"
    argv = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-p", "no:randomly"]
    return subprocess.run(
        [*argv, "-q", str(test)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )


@pytest.mark.parametrize("case", ["plain_skip", "missing_tool", "missing_root_mark"])
def test_under_ci_a_skip_or_a_missing_peer_fails_the_run(tmp_path: Path, case: str) -> None:
    r = _run(tmp_path, case, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    if case == "plain_skip":
        assert "1 unexpected skip(s) fail the run" in r.stdout
    else:
        assert "missing peer:" in r.stdout  # failed in the test, or in its setup (a mark)
        assert "1 failed" in r.stdout or "1 error" in r.stdout


@pytest.mark.parametrize("case", ["plain_skip", "missing_tool", "missing_root_mark"])
def test_locally_it_skips_and_the_summary_says_why(tmp_path: Path, case: str) -> None:
    r = _run(tmp_path, case, ci=False)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.stdout.split(" skips ", 1)[1]
    reason = {
        "plain_skip": "no reason given",
        "missing_tool": "missing peer: no-such-peer-tool is not installed",
        "missing_root_mark": "missing peer: a privilege this host lacks",
    }[case]
    assert f"1 skipped: {reason}" in summary, summary

def test_under_ci_a_clean_run_passes(tmp_path: Path) -> None:
    r = _run(tmp_path, "all_pass", ci=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no test skipped" in r.stdout
