"""How fast and how lean is the merge kernel on real-size checkpoints? (issue 3)

Generates ``--models`` random full-size SD1-layout fp16 checkpoints with the factory (``base`` + finetunes, ~2.1 GB
each) in ``--workdir`` (reused when present), warms the page cache, then in one run:

1. times ``astolfo-opt merge --average`` (a subprocess, so its peak RSS is its own: ``os.wait4`` rusage) against
   sd-mecha 1.1.8 ``n_average`` (fp32 merge, fp16 output, in its own subprocess), and compares the two outputs
   (max |diff| over the shared keys);
2. the incremental case: ``--incremental-models`` inputs (hard links cycling over the generated files, so the page
   cache holds only the distinct bytes; the merger treats every name as its own model), flip one model's inclusion
   in every component and compare the incremental merge's time against a from-scratch merge of the new recipe.

Targets on the 2-core CPU box (4 inputs): ours <= 0.25x sd-mecha's wall time and <= 1.5 GiB peak RSS; incremental
>= 5x faster than from scratch.

  python experiments/bench_merge.py --models 4 --json experiments/results/bench_merge.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024**3

MECHA_SCRIPT = """
import sys, torch, sd_mecha
config, device, out, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
models = [sd_mecha.model(p, config=config) for p in paths]
sd_mecha.merge(sd_mecha.n_average(*models), merge_dtype=torch.float32, output_dtype=torch.float16, output=out,
               merge_device=device, output_device="cpu", strict_mandatory_keys=False, check_extra_keys=False)
"""
#: sd-mecha's model config per architecture of the factory's full-size files
MECHA_CONFIG = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}


def ensure_pool(workdir: Path, n: int, arch: str = "sd1") -> list[Path]:
    """``base`` + ``n - 1`` full-size finetunes of ``arch``, generated once (a file that does not open is regenerated)."""
    from astolfo_opt.checkpoint.io import open_checkpoint
    from astolfo_opt.testing.factory import make_pool

    folder = workdir / f"{arch}_full_{n}"
    want = [folder / "base.safetensors", *(folder / f"m{i:02d}.safetensors" for i in range(n - 1))]
    ok = True
    for p in want:
        try:
            with open_checkpoint(p) as r:
                ok = ok and len(r.keys()) > 1000
        except Exception:
            ok = False
    if not ok:
        t0 = time.perf_counter()
        print(f"generating {n} full-size {arch} fp16 checkpoints in {folder} ...", flush=True)
        pool = make_pool(folder, n=n - 1, arch=arch, size="full")
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
        return pool.all
    return want


def warm(paths: list[Path]) -> float:
    """Read every file once so both tools start from the page cache (the merge, not the disk, is measured)."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t0


def run_child(cmd: list[str]) -> dict[str, Any]:
    """Spawn and reap with ``wait4`` ourselves so the peak RSS is exactly this child's."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    return {"rc": p.returncode, "seconds": wall, "peak_rss_gib": ru.ru_maxrss * 1024 / GIB,
            "stdout": out.strip()[-400:], "stderr": err.strip()[-600:]}


def max_abs_diff(a: Path, b: Path) -> dict[str, Any]:
    import torch

    from astolfo_opt.checkpoint.io import open_checkpoint

    worst, worst_key, n = 0.0, None, 0
    with open_checkpoint(a) as ra, open_checkpoint(b) as rb:
        kb = set(rb.keys())
        keys_a = ra.keys()
        shared = [k for k in keys_a if k in kb and not k.endswith("position_ids")]
        for k in shared:
            d = float((ra.get(k).to(torch.float32) - rb.get(k).to(torch.float32)).abs().max()) if ra.info(k).nbytes else 0.0
            n += 1
            if d > worst:
                worst, worst_key = d, k
        only_a, only_b = len(set(ra.keys()) - kb), len(kb - set(ra.keys()))
    return {"shared_keys": n, "max_abs_diff": worst, "worst_key": worst_key, "only_ours": only_a, "only_mecha": only_b}


def bench_full(paths: list[Path], workdir: Path, *, mecha: bool, threads: int | None, arch: str = "sd1",
               device: str = "cpu") -> dict[str, Any]:
    ours_out, mecha_out = workdir / "ours_average.safetensors", workdir / "mecha_average.safetensors"
    cmd = [sys.executable, "-m", "astolfo_opt.cli", "merge", "--average", *map(str, paths), "--out", str(ours_out),
           "--no-progress", "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    res: dict[str, Any] = {"inputs": len(paths), "input_gb": sum(p.stat().st_size for p in paths) / 1e9, "arch": arch,
                           "device": device}
    res["ours"] = run_child(cmd)
    print(f"ours:     {res['ours']['seconds']:.1f} s, peak RSS {res['ours']['peak_rss_gib']:.2f} GiB  "
          f"(rc {res['ours']['rc']}) {res['ours']['stdout'][-160:]}", flush=True)
    if mecha:
        warm(paths)
        res["mecha"] = run_child([sys.executable, "-c", MECHA_SCRIPT, MECHA_CONFIG[arch], device, str(mecha_out), *map(str, paths)])
        print(f"sd-mecha: {res['mecha']['seconds']:.1f} s, peak RSS {res['mecha']['peak_rss_gib']:.2f} GiB "
              f"(rc {res['mecha']['rc']})", flush=True)
        if res["mecha"]["rc"] == 0 and res["ours"]["rc"] == 0:
            res["ratio"] = res["ours"]["seconds"] / res["mecha"]["seconds"]
            res["diff"] = max_abs_diff(ours_out, mecha_out)
            print(f"ratio ours/sd-mecha: {res['ratio']:.3f}  diff: {res['diff']}", flush=True)
        mecha_out.unlink(missing_ok=True)
    ours_out.unlink(missing_ok=True)
    return res


def bench_incremental(paths: list[Path], workdir: Path, n_inputs: int, threads: int | None) -> dict[str, Any]:
    """Flip one model's inclusion (every component): incremental update vs from-scratch merge of the new recipe."""
    import torch

    from astolfo_opt.merge.incremental import IncrementalMerger
    from astolfo_opt.merge.kernel import merge
    from astolfo_opt.merge.recipe import ComponentRecipe, Member, Recipe
    from astolfo_opt.merge.sinks import NullSink

    links = workdir / f"inc_{n_inputs}"
    links.mkdir(exist_ok=True)
    models = {}
    for i in range(n_inputs):
        link = links / f"in{i:02d}.safetensors"
        if not link.exists():
            os.link(paths[i % len(paths)], link)
        models[link.stem] = str(link)
    names = list(models)
    comps = ("unet", "te0", "vae")

    def recipe(included: list[str]) -> Recipe:
        return Recipe(models=models, base=names[0],
                      components={c: ComponentRecipe("weighted_average", [Member(n) for n in included]) for c in comps})

    inc = IncrementalMerger(device="cpu", out_dtype=torch.float16, threads=threads)
    t0 = time.perf_counter()
    first = inc.merge(recipe(names), NullSink())
    t_first = time.perf_counter() - t0
    flipped = recipe(names[:-1])
    t0 = time.perf_counter()
    st_inc = inc.merge(flipped, NullSink())
    t_inc = time.perf_counter() - t0
    t0 = time.perf_counter()
    st_full = merge(flipped, NullSink(), device="cpu", out_dtype=torch.float16, threads=threads)
    t_full = time.perf_counter() - t0
    res = {"inputs": n_inputs, "first_incremental_s": t_first, "incremental_s": t_inc, "from_scratch_s": t_full,
           "speedup": t_full / t_inc, "incremental_gb_read": st_inc.bytes_read / 1e9,
           "from_scratch_gb_read": st_full.bytes_read / 1e9, "cache_gib": inc.used_bytes() / GIB,
           "first_gb_read": first.bytes_read / 1e9}
    inc.close()
    print(f"incremental ({n_inputs} inputs, flip one): {t_inc:.1f} s vs from scratch {t_full:.1f} s "
          f"-> {res['speedup']:.1f}x  (read {res['incremental_gb_read']:.2f} vs {res['from_scratch_gb_read']:.2f} GB; "
          f"first merge {t_first:.1f} s, cache {res['cache_gib']:.1f} GiB)", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=4, help="inputs of the full merge (base + models-1 finetunes)")
    ap.add_argument("--incremental-models", type=int, default=12, help="inputs of the incremental case (0: skip)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "astolfo-bench-merge")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--arch", choices=sorted(MECHA_CONFIG), default="sd1", help="layout of the generated full-size pool")
    ap.add_argument("--device", default="cpu", help="merge device of both tools (cpu, cuda)")
    ap.add_argument("--no-mecha", action="store_true", help="skip the sd-mecha comparison")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    paths = ensure_pool(a.workdir, a.models, a.arch)
    print(f"warm page cache: {warm(paths):.1f} s for {sum(p.stat().st_size for p in paths) / 1e9:.1f} GB", flush=True)
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
    result["full"] = bench_full(paths, a.workdir, mecha=not a.no_mecha, threads=a.threads, arch=a.arch, device=a.device)
    if a.incremental_models:
        warm(paths)
        result["incremental"] = bench_incremental(paths, a.workdir, a.incremental_models, a.threads)
    result["load_avg_end"] = os.getloadavg()
    if a.json:
        from astolfo_opt.checkpoint.writer import atomic_write_text

        a.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.json, json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
