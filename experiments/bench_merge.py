"""How fast and how lean is the merge kernel on real-size checkpoints? (issue 3)

Generates ``--models`` random full-size SD1-layout fp16 checkpoints with the factory (``base`` + finetunes, ~2.1 GB
each) in ``--workdir`` (reused when present), warms the page cache, then in one run:

1. times ``astolfo-opt merge --average`` (a subprocess, so its peak RSS is its own: ``os.wait4`` rusage) against
   sd-mecha 1.1.8 ``n_average`` (fp32 merge, fp16 output, in its own subprocess), and compares the two outputs
   (max |diff| over the shared keys);
2. the incremental case: ``--incremental-models`` inputs (hard links cycling over the generated files, so the page
   cache holds only the distinct bytes; the merger treats every name as its own model), flip one model's inclusion
   in every component and compare the incremental merge's time against a from-scratch merge of the new recipe.

3. the physical floor of a merge to a file, measured in the same run: starting Python and importing torch (a
   subprocess), plus writing the output's size of bytes from memory with ``fsync`` (what any tool must do at least);
   also the same write with ``O_DIRECT``, past the page cache (the disk's own speed: a stricter floor);
   and the merge's reads + arithmetic alone (in process, into a sink that keeps nothing), to show which part bounds it.

Every timed command runs once as a warm-up, then ``--repeats`` times (3); the median is reported, both tools with the
same ``--threads`` (default: ours' default, 2 on the 2-core box), from a warm page cache.

Targets on the 2-core CPU box (4 inputs): the whole ``merge --average`` process <= 1.25x the floor and <= 0.25x
sd-mecha's wall time, <= 1.5 GiB peak RSS; incremental >= 5x faster than from scratch.

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
config, device, threads, out, paths = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
models = [sd_mecha.model(p, config=config) for p in paths]
sd_mecha.merge(sd_mecha.n_average(*models), merge_dtype=torch.float32, output_dtype=torch.float16, output=out,
               merge_device=device, output_device="cpu", strict_mandatory_keys=False, check_extra_keys=False,
               threads=threads)
"""
#: the floor's two parts: an interpreter that imports torch, and an fsync'd write of N bytes from memory
IMPORT_SCRIPT = "import torch"
WRITE_SCRIPT = """
import os, sys
out, n = sys.argv[1], int(sys.argv[2])
buf = bytearray(64 << 20)
with open(out, "wb") as f:
    left = n
    while left:
        k = min(left, len(buf))
        f.write(memoryview(buf)[:k])
        left -= k
    f.flush()
    os.fsync(f.fileno())
os.unlink(out)
"""
#: the same bytes written past the page cache (O_DIRECT, 16 MiB aligned buffers): the disk's own speed, what a writer
#: that skips the kernel's copy can reach (ours streams large outputs this way, see checkpoint.writer.DirectStream)
DIRECT_WRITE_SCRIPT = """
import mmap, os, sys
out, n = sys.argv[1], int(sys.argv[2])
bs = 16 << 20
buf = mmap.mmap(-1, bs)
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
full, pos = n - n % 4096, 0
while pos < full:
    pos += os.pwrite(fd, memoryview(buf)[:min(bs, full - pos)], pos)
os.close(fd)
with open(out, "r+b") as f:
    f.seek(full)
    f.write(bytes(n - full))
    f.flush()
    os.fsync(f.fileno())
os.unlink(out)
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


def timed(cmd: list[str], repeats: int, label: str) -> dict[str, Any]:
    """One warm-up run, then ``repeats`` runs: the median wall time (and the runs), peak RSS of the slowest."""
    warmup = run_child(cmd)
    if warmup["rc"] != 0:
        print(f"{label}: failed (rc {warmup['rc']}): {warmup['stderr'][-400:]}", flush=True)
        return {**warmup, "runs": []}
    runs = [run_child(cmd) for _ in range(repeats)]
    secs = sorted(r["seconds"] for r in runs)
    out = {"rc": max(r["rc"] for r in runs), "seconds": secs[len(secs) // 2], "runs": [r["seconds"] for r in runs],
           "warmup_s": warmup["seconds"], "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
           "stdout": runs[-1]["stdout"], "stderr": runs[-1]["stderr"][-300:]}
    print(f"{label}: median {out['seconds']:.2f} s of {[round(x, 2) for x in out['runs']]} "
          f"(warm-up {warmup['seconds']:.2f} s), peak RSS {out['peak_rss_gib']:.2f} GiB", flush=True)
    return out


def compute_only(paths: list[Path], threads: int, repeats: int) -> dict[str, Any]:
    """The same merge in this process into a sink that keeps nothing: reads and arithmetic alone, no import, no file
    (what the file merge would cost if the write were free). Warm-up, then the median of ``repeats``."""
    import torch

    from astolfo_opt.merge.kernel import merge
    from astolfo_opt.merge.recipe import Recipe
    from astolfo_opt.merge.sinks import NullSink

    recipe = Recipe.average(paths)
    runs = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        merge(recipe, NullSink(), device="cpu", out_dtype=torch.float16, threads=threads)
        if i:
            runs.append(time.perf_counter() - t0)
    gb = sum(p.stat().st_size for p in paths) / 1e9
    med = sorted(runs)[len(runs) // 2]
    print(f"compute only (reads + arithmetic, null sink): median {med:.2f} s of {[round(x, 2) for x in runs]} "
          f"= {gb / med:.1f} GB/s of fp16 input", flush=True)
    return {"seconds": med, "runs": runs, "input_gb_per_s": gb / med}


def bench_full(paths: list[Path], workdir: Path, *, mecha: bool, threads: int | None, arch: str = "sd1",
               device: str = "cpu", repeats: int = 3) -> dict[str, Any]:
    from astolfo_opt.merge.execute import default_threads

    threads = threads or default_threads()
    ours_out, mecha_out = workdir / "ours_average.safetensors", workdir / "mecha_average.safetensors"
    cmd = [sys.executable, "-m", "astolfo_opt.cli", "merge", "--average", *map(str, paths), "--out", str(ours_out),
           "--no-progress", "--device", device, "--threads", str(threads)]
    res: dict[str, Any] = {"inputs": len(paths), "input_gb": sum(p.stat().st_size for p in paths) / 1e9, "arch": arch,
                           "device": device, "threads": threads, "repeats": repeats}
    warm(paths)
    res["ours"] = timed(cmd, repeats, "ours (merge --average)")
    out_bytes = ours_out.stat().st_size if ours_out.exists() else 0
    res["output_gb"] = out_bytes / 1e9
    imp = timed([sys.executable, "-c", IMPORT_SCRIPT], repeats, "floor: python + import torch")
    wr = timed([sys.executable, "-c", WRITE_SCRIPT, str(workdir / "floor.bin"), str(out_bytes)], repeats,
               f"floor: fsync'd write of {out_bytes / 1e9:.2f} GB")
    dwr = timed([sys.executable, "-c", DIRECT_WRITE_SCRIPT, str(workdir / "floor.bin"), str(out_bytes)], repeats,
                f"floor: O_DIRECT write of {out_bytes / 1e9:.2f} GB")
    res["floor"] = {"import_s": imp["seconds"], "write_s": wr["seconds"], "seconds": imp["seconds"] + wr["seconds"],
                    "write_gb_per_s": out_bytes / 1e9 / wr["seconds"] if wr["seconds"] else None,
                    "direct_write_s": dwr["seconds"], "direct_seconds": imp["seconds"] + dwr["seconds"]}
    res["ours_over_floor"] = res["ours"]["seconds"] / res["floor"]["seconds"]
    res["ours_over_direct_floor"] = res["ours"]["seconds"] / res["floor"]["direct_seconds"]
    res["compute_only"] = compute_only(paths, threads, repeats)
    print(f"floor {res['floor']['seconds']:.2f} s -> ours / floor = {res['ours_over_floor']:.2f}x (target <= 1.25x); "
          f"O_DIRECT floor {res['floor']['direct_seconds']:.2f} s -> {res['ours_over_direct_floor']:.2f}x", flush=True)
    if mecha:
        warm(paths)
        res["mecha"] = timed([sys.executable, "-c", MECHA_SCRIPT, MECHA_CONFIG[arch], device, str(threads), str(mecha_out),
                              *map(str, paths)], repeats, "sd-mecha n_average")
        if res["mecha"]["rc"] == 0 and res["ours"]["rc"] == 0 and res["mecha"]["runs"]:
            res["ratio"] = res["ours"]["seconds"] / res["mecha"]["seconds"]
            res["diff"] = max_abs_diff(ours_out, mecha_out)
            print(f"ratio ours/sd-mecha: {res['ratio']:.3f} (target <= 0.25)  diff: {res['diff']}", flush=True)
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
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (the median is reported)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    paths = ensure_pool(a.workdir, a.models, a.arch)
    print(f"warm page cache: {warm(paths):.1f} s for {sum(p.stat().st_size for p in paths) / 1e9:.1f} GB", flush=True)
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
    result["full"] = bench_full(paths, a.workdir, mecha=not a.no_mecha, threads=a.threads, arch=a.arch, device=a.device,
                                repeats=a.repeats)
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
