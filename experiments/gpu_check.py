"""One prepared check for a CUDA machine (``make gpu-check``): every GPU claim of the README measured in one call.

A device is lent to a session for minutes, so everything runs from one command under one time budget (default 8 min),
each stage in its own process with its own time-out, most important first:

1. ``cuda_tests``   the CUDA-marked tests (``pytest -m gpu``);
2. ``pool_sd1``     4 full-size SD1 fp16 checkpoints from the factory (bench_merge.ensure_pool), on local disk;
3. ``merge_sd1``    ``astolfo-opt merge --average`` to a file vs sd-mecha ``n_average``, both on the GPU (bench_merge);
4. ``swap_sd1``     recipe -> ready pipeline by in-place swap vs write + ``from_single_file`` (bench_swap; target >= 10x);
5. ``pool_sdxl``    4 full-size SDXL fp16 checkpoints;
6. ``sdxl_fp16``    the SDXL fp16 path renders 1024 px / 20 steps with no NaN and no black image;
7. ``trial_sd1``    the full-size trial split at 512 px / 20 steps (bench_trial);
8. ``merge_sdxl``   the merge comparison on SDXL;
9. ``trial_sdxl``   the trial split at 1024 px / 20 steps.

Peak GPU memory (device-wide, sampled every 0.2 s, so sd-mecha's is counted too) and peak host RSS (``wait4``) are
recorded per stage. The JSON is rewritten after every stage, so a run cut short still leaves its figures; a table is
printed at the end. Without CUDA it prints one line and exits 0; ``--dry-run`` prints the plan (commands, time-outs,
disk needed vs free) on any machine and is what the CPU test checks.

  python experiments/gpu_check.py --json experiments/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
GIB = 1024**3
#: size on disk of one full-size fp16 checkpoint (SD1: the factory file, measured; SDXL: a real fp16 file), for the disk plan
FULL_GB = {"sd1": 2.13, "sdxl": 6.94}

SDXL_FP16_SCRIPT = """
import json, sys, time, numpy as np, torch
from pathlib import Path
from astolfo_opt.render.pipeline import build_pipeline
from astolfo_opt.render.prompts import Prompt
from astolfo_opt.render.settings import RenderSettings
base, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
pipe = build_pipeline(Path(base), device="cuda")
t_build = time.perf_counter() - t0
s = RenderSettings(width=1024, height=1024, steps=20, guidance_scale=7.0)
prompts = [Prompt("a photo of a cat on a sofa", "", 1), Prompt("a red car and a person, city street", "", 2)]
t0 = time.perf_counter()
imgs = [np.asarray(i, dtype=np.float32) / 255.0 for i in pipe.render(prompts, s)]
t_render = time.perf_counter() - t0
raw = pipe.pipe(prompt=[p.prompt for p in prompts], width=1024, height=1024, num_inference_steps=20, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(p.seed) for p in prompts]).images
res = {"dtype": str(pipe.dtype), "build_s": t_build, "render_s": t_render, "images": len(imgs),
       "raw_finite": bool(np.isfinite(raw).all()), "min": float(min(i.min() for i in imgs)),
       "max": float(max(i.max() for i in imgs)), "std": [float(i.std()) for i in imgs],
       "black": [bool(i.max() < 0.02) for i in imgs], "vae_dtype": str(pipe.modules["vae"].decoder.conv_out.weight.dtype),
       "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
res["ok"] = res["raw_finite"] and not any(res["black"]) and min(res["std"]) > 0.01
Path(out).write_text(json.dumps(res, indent=1))
print(json.dumps(res))
sys.exit(0 if res["ok"] else 1)
"""

POOL_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from bench_merge import ensure_pool
t0 = time.perf_counter()
paths = ensure_pool(__import__("pathlib").Path(sys.argv[2]), 4, sys.argv[3])
print(f"{len(paths)} files, {sum(p.stat().st_size for p in paths) / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s")
"""


@dataclass
class Stage:
    """One step of the check: a child process, its time-out, and where its figures come back."""

    name: str
    what: str
    cmd: list[str]
    timeout_s: int
    json_out: Path | None = None
    disk_gb: float = 0.0  # what it leaves on disk (pools) or needs while it runs (merge outputs)
    result: dict[str, Any] = field(default_factory=dict)


def plan(work: Path, out_dir: Path) -> list[Stage]:
    py = sys.executable
    j = lambda n: out_dir / f"{n}.json"  # noqa: E731
    return [
        Stage("cuda_tests", "CUDA-marked tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                                  str(ROOT / "tests")], 150),
        Stage("pool_sd1", "generate 4 full-size SD1 fp16 files", [py, "-c", POOL_SCRIPT, str(EXP), str(work), "sd1"], 120,
              disk_gb=4 * FULL_GB["sd1"]),
        Stage("merge_sd1", "merge --average vs sd-mecha n_average, GPU, SD1",
              [py, str(EXP / "bench_merge.py"), "--arch", "sd1", "--device", "cuda", "--incremental-models", "0",
               "--workdir", str(work), "--json", str(j("merge_sd1"))], 120, j("merge_sd1"), 2 * FULL_GB["sd1"]),
        Stage("swap_sd1", "recipe -> pipeline: in-place swap vs write + from_single_file, GPU, SD1",
              [py, str(EXP / "bench_swap.py"), "--device", "cuda", "--repeat", "2", "--workdir", str(work), "--json", str(j("swap_sd1"))],
              120, j("swap_sd1"), 2 * FULL_GB["sd1"]),
        Stage("pool_sdxl", "generate 4 full-size SDXL fp16 files", [py, "-c", POOL_SCRIPT, str(EXP), str(work), "sdxl"], 180,
              disk_gb=4 * FULL_GB["sdxl"]),
        Stage("sdxl_fp16", "SDXL fp16 renders at 1024 px / 20 steps: no NaN, no black image",
              [py, "-c", SDXL_FP16_SCRIPT, str(work / "sdxl_full_4" / "base.safetensors"), str(j("sdxl_fp16"))], 90, j("sdxl_fp16")),
        Stage("trial_sd1", "full-size trial split, 512 px / 20 steps, SD1",
              [py, str(EXP / "bench_trial.py"), "--arch", "sd1", "--device", "cuda", "--trials", "4", "--size", "512", "--steps", "20",
               "--prompts", "4", "--workdir", str(work), "--json", str(j("trial_sd1"))], 150, j("trial_sd1")),
        Stage("merge_sdxl", "merge --average vs sd-mecha n_average, GPU, SDXL",
              [py, str(EXP / "bench_merge.py"), "--arch", "sdxl", "--device", "cuda", "--incremental-models", "0",
               "--workdir", str(work), "--json", str(j("merge_sdxl"))], 180, j("merge_sdxl"), 2 * FULL_GB["sdxl"]),
        Stage("trial_sdxl", "full-size trial split, 1024 px / 20 steps, SDXL",
              [py, str(EXP / "bench_trial.py"), "--arch", "sdxl", "--device", "cuda", "--trials", "3", "--size", "1024", "--steps", "20",
               "--prompts", "2", "--workdir", str(work), "--json", str(j("trial_sdxl"))], 180, j("trial_sdxl")),
    ]


def disk_needed_gb(stages: list[Stage]) -> float:
    """Pools stay for the whole run; a merge's outputs only while it runs: the largest of those on top."""
    pools = sum(s.disk_gb for s in stages if s.name.startswith("pool_"))
    return pools + max((s.disk_gb for s in stages if not s.name.startswith("pool_")), default=0.0)


class GpuMemoryPoller:
    """Peak device-wide GPU memory in use while a stage runs (every process on the device, sd-mecha's too)."""

    def __init__(self, period: float = 0.2):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._smi = shutil.which("nvidia-smi")
        self._thread: threading.Thread | None = None

    def _used(self) -> int:
        if self._smi:
            try:
                out = subprocess.run([self._smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                return int(float(out[0])) * 1024**2
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def __enter__(self) -> GpuMemoryPoller:
        self.base, self.peak = self._used(), 0
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.period):
                self.peak = max(self.peak, self._used())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited just now
        os.killpg(pid, 9)


def run_stage(st: Stage, timeout: float, log_dir: Path) -> dict[str, Any]:
    """Run one stage in its own process group (killed whole at the time-out); wall time, rc, peak RSS (wait4)."""
    log = log_dir / f"{st.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fo:
        p = subprocess.Popen(st.cmd, stdout=fo, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        killer = threading.Timer(timeout, _kill_group, (p.pid,))
        killer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            killer.cancel()
    rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    res: dict[str, Any] = {"rc": rc, "seconds": round(wall, 1), "timed_out": rc == -9 and wall >= timeout - 1,
                           "peak_rss_gib": round(ru.ru_maxrss * 1024 / GIB, 2), "log_tail": tail}
    if st.json_out is not None and st.json_out.exists():
        res["figures"] = json.loads(st.json_out.read_text())
    return res


def headline(st: Stage) -> str:
    """The one figure of a stage the README table quotes."""
    r, f = st.result, st.result.get("figures") or {}
    if not r:
        return "not run"
    if st.name == "cuda_tests":
        return (r.get("log_tail") or ["?"])[-1]
    if st.name.startswith("merge_") and "full" in f:
        full = f["full"]
        ours, mecha = full.get("ours", {}), full.get("mecha", {})
        return (f"ours {ours.get('seconds', float('nan')):.1f} s vs sd-mecha {mecha.get('seconds', float('nan')):.1f} s "
                f"({full.get('ratio', float('nan')):.2f}x), max|diff| {(full.get('diff') or {}).get('max_abs_diff', float('nan')):.2g}")
    if st.name == "swap_sd1" and "a_swap_s" in f:
        return (f"swap {f['a_swap_s']:.2f} s vs write+from_single_file {f['c_total_s']:.2f} s: "
                f"{f['c_total_s'] / f['a_swap_s']:.1f}x (target >= 10x); same image {f.get('a_equals_c_image')}")
    if st.name.startswith("trial_") and "split" in f:
        return (f"outside render+score {100 * f['outside_share_all']:.1f}% (after the first trial "
                f"{100 * f['outside_share_after_first']:.1f}%); render {f['split'].get('render', 0):.1f} s")
    if st.name == "sdxl_fp16" and f:
        return f"finite {f.get('raw_finite')}, black {f.get('black')}, std {min(f.get('std') or [0]):.3f}, {f.get('dtype')}"
    return (r.get("log_tail") or [""])[-1][:100]


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "gpu_check.json")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "astolfo-gpu-check",
                    help="local disk for the generated pools (about 40 GB)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (stages that no longer fit are skipped)")
    ap.add_argument("--only", default="", help="comma-separated stage names (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the disk check; run nothing")
    a = ap.parse_args(argv)

    import torch

    stages = plan(a.workdir, a.workdir / "results")
    if a.only:
        want = {s.strip() for s in a.only.split(",") if s.strip()}
        unknown = want - {s.name for s in stages}
        if unknown:
            print(f"gpu-check: unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(s.name for s in stages)}")
            return 2
        stages = [s for s in stages if s.name in want]
    need = disk_needed_gb(stages)
    probe = a.workdir if a.workdir.exists() else a.workdir.parent
    free = shutil.disk_usage(probe).free / 1e9
    cuda = torch.cuda.is_available()
    doc: dict[str, Any] = {"cuda": cuda, "torch": torch.__version__, "budget_s": a.budget, "workdir": str(a.workdir),
                           "disk_needed_gb": round(need, 1), "disk_free_gb": round(free, 1),
                           "device": torch.cuda.get_device_name(0) if cuda else None,
                           "stages": {s.name: {"what": s.what, "timeout_s": s.timeout_s, "cmd": s.cmd} for s in stages}}
    if a.dry_run:
        for s in stages:
            print(f"{s.name:11s} {s.timeout_s:4d} s  {s.what}")
        print(f"disk: {need:.1f} GB needed under {a.workdir}, {free:.1f} GB free; budget {a.budget:.0f} s; "
              f"CUDA {'available' if cuda else 'not available'}")
        write_json(a.json, {**doc, "dry_run": True})
        return 0
    if not cuda:
        print(f"gpu-check: CUDA is not available here (torch {torch.__version__}); nothing measured. "
              "Run `make gpu-check` on a CUDA machine.")
        return 0
    if free < need:
        print(f"gpu-check: {a.workdir} has {free:.1f} GB free, the pools need {need:.1f} GB; pass --workdir on a larger disk")
        return 2
    a.workdir.mkdir(parents=True, exist_ok=True)
    return run_stages(stages, doc, a.json, a.workdir / "results", a.budget, memory=GpuMemoryPoller)


def run_stages(stages: list[Stage], doc: dict[str, Any], json_path: Path, log_dir: Path, budget: float,
               memory: Any = None, min_left: float = 20.0) -> int:
    """Run the stages in order under one time budget: each gets ``min(its time-out, what is left)``, a stage that
    would get under ``min_left`` seconds is skipped, the JSON is rewritten after every stage (a run cut short keeps
    what it measured) and a table is printed. ``memory``: a context-manager class with ``.peak`` / ``.base`` bytes
    (the GPU poller; None on a CPU test). Returns 0 when every stage that ran exited 0, else 1."""
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + budget
    for st in stages:
        left = deadline - time.perf_counter()
        if left < min_left:
            st.result = {"skipped": f"budget spent ({budget:.0f} s)"}
        else:
            print(f"[{st.name}] {st.what} (time-out {min(st.timeout_s, left):.0f} s) ...", flush=True)
            with (memory() if memory is not None else contextlib.nullcontext()) as mem:
                st.result = run_stage(st, min(st.timeout_s, left), log_dir)
            if mem is not None:
                st.result["peak_gpu_gib"] = round(mem.peak / GIB, 2)
                st.result["gpu_before_gib"] = round(mem.base / GIB, 2)
            print(f"[{st.name}] rc {st.result['rc']} in {st.result['seconds']} s: {headline(st)}", flush=True)
        doc["stages"][st.name].update(st.result, headline=headline(st))
        write_json(json_path, doc)
    print(f"\n{'stage':11s} {'rc':>4s} {'sec':>6s} {'GPU GiB':>8s} {'RSS GiB':>8s}  figure")
    for st in stages:
        r = st.result
        print(f"{st.name:11s} {str(r.get('rc', '-')):>4s} {r.get('seconds', 0):6.1f} {r.get('peak_gpu_gib', 0):8.2f} "
              f"{r.get('peak_rss_gib', 0):8.2f}  {headline(st)}")
    print(f"written: {json_path}")
    return 0 if all(st.result.get("rc", 0) == 0 for st in stages) else 1

if __name__ == "__main__":
    sys.exit(main())
