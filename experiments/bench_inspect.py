"""How long does ``astolfo-opt inspect`` take on a real-size pool, and does it find what is wrong? (issue 2)

Generates four full-size SD1-layout fp16 checkpoints with the factory (~2.1 GB each) in ``--workdir`` (reused when
present): ``clean``, ``pruned`` (VAE missing, like the seeds' "VAE-v1-BROKEN" files), ``nan`` (NaN planted in one
UNet tensor) and ``dup_te0`` (text encoder copied bit for bit from ``clean``). Then, with a warm page cache, it runs
``astolfo-opt inspect --json`` three ways, each in its own process:

1. ``--no-scan`` (headers only: architecture, missing keys, shapes, EMA, position_ids),
2. a full scan with the cache disabled (every tensor streamed once: sha256, component hashes, NaN / Inf),
3. the same again with the cache filled by a first scan (what a re-inspection of an unchanged pool costs),

and prints wall time, throughput and what each model was found to have.

  python experiments/bench_inspect.py --workdir /tmp/astolfo-bench-inspect --json experiments/results/bench_inspect.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NAN_KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


def ensure_pool(folder: Path) -> list[Path]:
    """The four models, generated once (a file that does not open is regenerated)."""
    from astolfo_opt.checkpoint.io import open_checkpoint
    from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    specs = {
        "clean": ModelSpec(size="full", seed=1),
        "pruned": ModelSpec(size="full", seed=2, drop={"vae": 1.0}),
        "nan": ModelSpec(size="full", seed=3, corrupt={NAN_KEY: "nan"}),
        "dup_te0": ModelSpec(size="full", seed=4, copy_components={"te0": folder / "clean.safetensors"}),
    }
    out = []
    for name, spec in specs.items():
        p = folder / f"{name}.safetensors"
        try:
            with open_checkpoint(p) as r:
                ok = len(r.keys()) > 900
        except Exception:  # noqa: BLE001 - anything unreadable is regenerated
            ok = False
        if not ok:
            t = time.perf_counter()
            make_checkpoint(p, spec)
            print(f"generated {p} ({p.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f}s", flush=True)
        out.append(p)
    return out


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def run_inspect(paths: list[Path], json_out: Path, *args: str, env: dict[str, str]) -> tuple[float, int, dict]:
    cmd = [sys.executable, "-m", "astolfo_opt.cli", "inspect", "--quiet", "--json", str(json_out), *args, *map(str, paths)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    report = json.loads(json_out.read_text()) if json_out.is_file() else {}
    if proc.returncode not in (0, 1):
        print(proc.stdout[-2000:], proc.stderr[-2000:])
    return dt, proc.returncode, report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/astolfo-bench-inspect")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    work = Path(a.workdir)
    paths = ensure_pool(work / "sd1_full_4")
    gb = sum(p.stat().st_size for p in paths) / 1e9
    warm(paths)
    env = {**os.environ, "ASTOLFO_OPT_CACHE": str(work / "cache")}
    (work / "cache").mkdir(exist_ok=True)
    (work / "cache" / "inspect.json").unlink(missing_ok=True)
    rows = {}
    for label, args in (("headers only (--no-scan)", ("--no-scan", "--no-cache")), ("full scan, no cache", ("--no-cache",)),
                        ("full scan, filling the cache", ()), ("re-inspect, cached", ())):
        dt, rc, rep = run_inspect(paths, work / "report.json", *args, env=env)
        rows[label] = {"seconds": round(dt, 2), "rc": rc, "gb_per_s": round(gb / dt, 2)}
        print(f"{label:32s} {dt:7.2f} s  ({gb / dt:5.2f} GB/s over {gb:.1f} GB)  exit {rc}", flush=True)
        last = rep
    findings = {}
    for m in last.get("models", []):
        findings[m["name"]] = sorted({f"{f['kind']}:{f.get('component')}" for f in m.get("findings", [])})
    groups = last.get("identical_groups", {})
    print("findings:", json.dumps(findings, indent=1))
    print("identical components:", groups)
    if a.json:
        from astolfo_opt.checkpoint.writer import atomic_write_text

        atomic_write_text(Path(a.json), json.dumps({"models": 4, "input_gb": round(gb, 2), "cpu_count": os.cpu_count(),
                                                     "runs": rows, "findings": findings, "identical_groups": groups}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
