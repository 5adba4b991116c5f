"""experiments/gpu_check.py (``make gpu-check``) on a CPU machine: the plan it would run is valid (every stage's
script exists and accepts the flags the plan passes), the disk plan adds up, and without CUDA it says so in one line
and exits 0. The measurements themselves need a lent GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_dry_run_plans_every_stage_with_valid_commands(tmp_path):
    out = tmp_path / "plan.json"
    r = _run("--dry-run", "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["dry_run"] and doc["cuda"] == torch.cuda.is_available()
    stages = doc["stages"]
    assert list(stages) == ["cuda_tests", "pool_sd1", "merge_sd1", "swap_sd1", "pool_sdxl", "sdxl_fp16", "trial_sd1",
                            "merge_sdxl", "trial_sdxl"]
    assert sum(s["timeout_s"] for s in stages.values()) >= doc["budget_s"]  # the budget, not the time-outs, bounds the run
    # pools (4 x SD1 + 4 x SDXL) plus the largest merge's two outputs
    assert doc["disk_needed_gb"] == pytest.approx(4 * 2.13 + 4 * 6.94 + 2 * 6.94, abs=0.1)
    assert f"{doc['disk_needed_gb']:.1f} GB needed" in r.stdout
    helps: dict[str, str] = {}
    for name, st in stages.items():
        cmd = st["cmd"]
        scripts = [c for c in cmd if c.endswith(".py") and "/experiments/" in c]
        for s in scripts:  # every flag the plan passes is one the benchmark script accepts
            assert Path(s).exists(), s
            if s not in helps:
                h = subprocess.run([sys.executable, s, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
                assert h.returncode == 0, h.stderr
                helps[s] = h.stdout
            for flag in (c for c in cmd if c.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", helps[s]), (name, flag)
    assert stages["cuda_tests"]["cmd"][-5:-2] == ["-m", "gpu", "-p"]


def test_unknown_stage_is_one_line():
    r = _run("--dry-run", "--only", "merge_sd1,nope")
    assert r.returncode == 2 and "unknown stage 'nope'" in r.stdout and len(r.stdout.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine path")
def test_without_cuda_one_line_and_exit_zero(tmp_path):
    out = tmp_path / "g.json"
    r = _run("--json", str(out), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "CUDA is not available" in r.stdout
    assert not out.exists() and not (tmp_path / "w").exists()  # nothing measured, nothing written


def test_stage_runner_budget_timeouts_and_json(tmp_path, experiment):
    """The orchestration a GPU run depends on, run on CPU with stand-in stages: figures come back from a stage's JSON,
    a stage past its time-out is killed with its whole process group, a stage the budget no longer fits is skipped,
    and the JSON is complete after the run."""
    gc = experiment("gpu_check")
    py = sys.executable
    child = tmp_path / "grandchild.pid"
    figures = tmp_path / "ok.json"
    stages = [
        gc.Stage("ok", "writes figures", [py, "-c", f"import json; open({str(figures)!r}, 'w').write(json.dumps({{'x': 1}}))"], 30,
                 figures),
        gc.Stage("slow", "sleeps past its time-out", ["bash", "-c", f"sleep 60 & echo $! > {child}; wait"], 4),
        gc.Stage("late", "no budget left", [py, "-c", "print(1)"], 30),  # after 4 s of "slow", under 5 of 9 are left
    ]
    doc = {"stages": {s.name: {"what": s.what} for s in stages}}
    out = tmp_path / "gpu_check.json"
    rc = gc.run_stages(stages, doc, out, tmp_path / "logs", budget=9.0, min_left=5.0)
    assert rc == 1  # a stage failed (timed out)
    got = json.loads(out.read_text())["stages"]
    assert got["ok"]["rc"] == 0 and got["ok"]["figures"] == {"x": 1} and got["ok"]["peak_rss_gib"] > 0
    assert got["slow"]["timed_out"] and got["slow"]["rc"] == -9 and 3.5 < got["slow"]["seconds"] < 15
    assert "budget spent" in got["late"]["skipped"] and "rc" not in got["late"]
    pid = int(child.read_text())
    for _ in range(50):  # the sleeping grandchild went with its group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} survived the stage's time-out")
    assert (tmp_path / "logs" / "ok.log").exists()


def test_make_with_system_python_skips_the_venv(tmp_path):
    """The lent GPU machine has no registry: `make gpu-check SYSTEM_PY=...` must install nothing and put the repo on
    PYTHONPATH, and the options in GPU_ARGS must reach the script."""
    args = f"GPU_ARGS=--dry-run --json {tmp_path / 'p.json'} --workdir {tmp_path / 'w'} --only merge_sd1"
    plan = subprocess.run(["make", "-n", "gpu-check", f"SYSTEM_PY={sys.executable}", args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "pip install" not in plan.stdout and f"PYTHONPATH={ROOT}" in plan.stdout
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAKEFLAGS", "MFLAGS")}
    r = subprocess.run(["make", "-s", "gpu-check", f"SYSTEM_PY={sys.executable}", args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(json.loads((tmp_path / "p.json").read_text())["stages"]) == ["merge_sd1"]
