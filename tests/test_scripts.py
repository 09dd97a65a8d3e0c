"""The newcomer's scripts (scripts/test.sh, scripts/demo.sh): what they promise on the paths that need no ComfyUI, no
network and no set-up, so each case takes well under a second.

- test.sh --help documents the three ways to provide ComfyUI and --core;
- test.sh with no ComfyUI (COMFYUI_SNAPSHOT=none hides the snapshot beside the checkout, COMFYUI_CLONE=0 skips the
  clone) stops with exit 2 and the how-to, before any set-up; a COMFYUI_PATH / COMFYUI_SNAPSHOT that is set but holds
  nothing stops it too;
- test.sh --core runs pytest without COMFYUI_PATH, passes pytest's exit status on, and its LAST line says how many
  host/browser tests did not run (a stand-in python plays .venv's, in a copy of the scripts);
- demo.sh erases ukiyo by default whatever other arguments are given, a --concept given wins, and --help shows
  `bash scripts/demo.sh` and the default concept (same stand-in).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def run(script: Path, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def no_comfyui_env(tmp_path: Path, **extra: str) -> dict:
    """An environment in which test.sh finds no ComfyUI: no COMFYUI_PATH, no snapshot, no clone (and an empty cache,
    so a clone made before on this machine is not found either), its venv/log in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFYUI", "SPARE_"))}
    env.update(COMFYUI_SNAPSHOT="none", COMFYUI_CLONE="0", XDG_CACHE_HOME=str(tmp_path / "cache"),
               VENV=str(tmp_path / "venv"))
    env.update(extra)
    return env


HOWTO = ("COMFYUI_PATH=/path/to/ComfyUI bash scripts/test.sh", "COMFYUI_SNAPSHOT=", "git clone --depth 1 --branch v0.3.64",
         "bash scripts/test.sh --core")


def test_test_sh_help_lists_the_three_ways_and_core():
    proc = run(ROOT / "scripts" / "test.sh", "--help")
    assert proc.returncode == 0, proc.stderr
    for needle in ("COMFYUI_PATH=", "COMFYUI_SNAPSHOT=none", "git clone --depth 1 --branch v0.3.64", "COMFYUI_CLONE=0",
                   "--core", "setup.log", "OMP_NUM_THREADS"):
        assert needle in proc.stdout, needle


def test_test_sh_without_comfyui_stops_with_the_howto(tmp_path):
    proc = run(ROOT / "scripts" / "test.sh", "-x", env=no_comfyui_env(tmp_path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    for needle in HOWTO:
        assert needle in proc.stderr, needle
    assert "COMFYUI_SNAPSHOT=none (not looked for)" in proc.stderr and "COMFYUI_CLONE=0" in proc.stderr
    assert "passed" not in proc.stdout and "test.sh: ComfyUI" not in proc.stdout  # no set-up, no pytest


@pytest.mark.parametrize("var", ["COMFYUI_PATH", "COMFYUI_SNAPSHOT"])
def test_test_sh_stops_on_a_given_path_that_holds_no_comfyui(tmp_path, var):
    given = tmp_path / "nothing_here"
    proc = run(ROOT / "scripts" / "test.sh", env=no_comfyui_env(tmp_path, **{var: str(given)}))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{var}={given}" in proc.stderr
    for needle in HOWTO:
        assert needle in proc.stderr, needle


# --- with a stand-in for .venv's python, in a copy of the scripts ----------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in for .venv/bin/python: "-c ..." (the scripts' readiness checks) succeeds; "-m pytest" writes a JUnit file
# with 3 tests skipped for want of ComfyUI and 1 for another reason, says what it got, and exits $FAKE_PYTEST_RC;
# "-m bench.minicanvas.demo" prints its arguments; anything else (test.sh's JUnit reader) goes to the real python.
if [ "$1" = -c ]; then exit 0; fi
if [ "$1" = -m ] && [ "$2" = pytest ]; then
    for a in "$@"; do case "$a" in --junitxml=*) xml=${a#--junitxml=} ;; esac; done
    cat >"$xml" <<'EOF'
<testsuites><testsuite name="pytest" tests="5" skipped="4">
<testcase name="a"><skipped message="COMFYUI_PATH is not set or holds no ComfyUI checkout"/></testcase>
<testcase name="b"><skipped message="COMFYUI_PATH is not set or holds no ComfyUI checkout (run ...)"/></testcase>
<testcase name="c"><skipped message="COMFYUI_PATH is not set"/></testcase>
<testcase name="d"><skipped message="needs a GPU"/></testcase>
<testcase name="e"/>
</testsuite></testsuites>
EOF
    echo "fake pytest: COMFYUI_PATH=${COMFYUI_PATH-<unset>} OMP_NUM_THREADS=$OMP_NUM_THREADS args: ${*:3}"
    exit "${FAKE_PYTEST_RC:-0}"
fi
if [ "$1" = -m ] && [ "$2" = bench.minicanvas.demo ]; then
    shift 2
    if [ "$1" = --help ]; then echo "usage: python -m bench.minicanvas.demo"; echo; echo "options:"; exit 0; fi
    echo "demo args: $*"
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of scripts/ whose .venv/bin/python is the stand-in above."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    py = repo / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    return repo


def fake_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFYUI", "SPARE_", "OMP_"))}
    env.update(REAL_PYTHON=sys.executable, COMFYUI_PATH="/somewhere/ComfyUI", **extra)
    return env


@pytest.mark.parametrize("rc", [0, 1])
def test_test_sh_core_runs_without_comfyui_and_says_so_last(fake_repo, rc):
    proc = run(fake_repo / "scripts" / "test.sh", "--core", "-k", "x", env=fake_env(FAKE_PYTEST_RC=str(rc)))
    assert proc.returncode == rc, (proc.stdout, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("core tests only: 3 host/browser tests were not run"), lines
    assert lines[0].startswith("test.sh: core tests only") and len(lines) == 3, lines  # status, pytest, last line
    assert "COMFYUI_PATH=<unset> OMP_NUM_THREADS=1 args: -q --junitxml=" in lines[1] and lines[1].endswith("-k x")


def test_demo_sh_default_concept_holds_with_other_arguments(fake_repo):
    script = fake_repo / "scripts" / "demo.sh"

    def concept(*args: str) -> tuple[str, list[str]]:
        proc = run(script, *args, env=fake_env())
        assert proc.returncode == 0, proc.stderr
        argv = proc.stdout.strip().removeprefix("demo args: ").split()
        # what argparse does with a repeated option: the last one wins
        return [argv[i + 1] for i, a in enumerate(argv) if a == "--concept"][-1], argv

    assert concept()[0] == "ukiyo"
    got, argv = concept("--steps", "5")
    assert got == "ukiyo" and argv[-2:] == ["--steps", "5"]
    assert concept("--concept", "ring", "--steps", "5")[0] == "ring"


def test_demo_sh_help_shows_its_own_usage_and_default(fake_repo):
    proc = run(fake_repo / "scripts" / "demo.sh", "--steps", "5", "--help", env=fake_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bash scripts/demo.sh")
    assert "default concept: ukiyo" in proc.stdout
    assert "python -m bench.minicanvas.demo" not in proc.stdout  # demo.py's own usage line is left out
