"""``astolfo-opt world build``: the world folder, built deterministically per seed, cached, manifest written last.

Layout of ``OUT/``::

    pool/base.safetensors       trained on every training concept
    pool/mNN.safetensors        finetunes of the base: each gains its concepts and forgets one colour; the outliers
                                (``world.json`` names them) are trained far off at a high learning rate
    pool/mNN_nan / _pruned / _te_of_m00   planted faults: NaN in a UNet tensor, no VAE, another model's text encoder
    scorer/                     the tower (open_clip architecture JSON + weights) and the aesthetic head
    judge/judge.safetensors     the held-out judge
    prompts.yaml, heldout.yaml  the study's prompt set (with its render settings) and never-trained combinations
    world.json                  the manifest: seed, what each model was trained on, losses, hashes, build times

A folder without ``world.json`` is unfinished, whatever else it holds: the manifest is written last, atomically, and
:func:`load_world` checks every file it lists (size and hash) before anything uses the world.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from astolfo_opt.checkpoint.writer import atomic_write_text
from astolfo_opt.errors import ConfigError
from astolfo_opt.world import concepts as C
from astolfo_opt.world import vae as V

WORLD_VERSION = 1
#: how the world is rendered: the prompt set carries it (``render:``), and conf/scorer/world.yaml repeats it for search
RENDER = {"width": 64, "height": 64, "steps": 20, "guidance_scale": 3.0, "scheduler": "euler"}
N_PROMPTS = 12
PROMPT_SEED0 = 100


@dataclass(frozen=True)
class Profile:
    """Training budget of a world size (steps per stage). ``demo``: <= 3 min on 2 cores; ``bench``: 32 models in
    <= 20 min; ``test``: seconds, for tests of the machinery (its models have barely learned anything)."""

    models: int
    base_steps: int
    text_steps: int
    ft_steps: int
    outlier_steps: int
    tower_steps: int
    head_steps: int
    judge_steps: int
    variants: int = 48  # drawn images per concept


PROFILES = {
    "demo": Profile(models=5, base_steps=250, text_steps=100, ft_steps=80, outlier_steps=30, tower_steps=140, head_steps=100,
                    judge_steps=180),
    "bench": Profile(models=32, base_steps=450, text_steps=150, ft_steps=80, outlier_steps=40, tower_steps=300, head_steps=200,
                     judge_steps=300),
    "test": Profile(models=3, base_steps=12, text_steps=5, ft_steps=4, outlier_steps=4, tower_steps=4, head_steps=4,
                    judge_steps=4, variants=4),
}


@dataclass
class FinetuneSpec:
    name: str
    role: str  # finetune | outlier
    colour: str | None = None  # specialty colour
    shape: str | None = None  # specialty shape
    forgets: str | None = None  # colour whose prompts it learns to draw in its own colour
    train_text: bool = False
    lr: float = 2e-3
    steps: int = 0
    final_loss: float = float("nan")
    seconds: float = 0.0


def finetune_plan(n: int, profile: Profile) -> list[FinetuneSpec]:
    """``n`` models: outliers at fixed inner positions (1 below 12 models, else 2), the rest finetunes cycling through
    colours and shapes; every second one also trains its text encoder."""
    colours, shapes = list(C.COLOURS), list(C.SHAPES)
    outliers = {n // 2} if n < 12 else {n // 3, (2 * n) // 3}
    plan, k = [], 0
    for i in range(n):
        name = f"m{i:02d}"
        if i in outliers:
            plan.append(FinetuneSpec(name, "outlier", train_text=True, lr=2e-2, steps=profile.outlier_steps))
            continue
        a = colours[k % 4]
        plan.append(FinetuneSpec(name, "finetune", colour=a, shape=shapes[(k + k // 4) % 4], forgets=colours[(k + 1) % 4],
                                 train_text=k % 2 == 1, lr=1.5e-3, steps=profile.ft_steps))
        k += 1
    return plan


class WorldData:
    """Drawn images (as latents) per concept, and the samplers every stage trains on."""

    def __init__(self, seed: int, variants: int):
        self.concepts = C.all_concepts()
        self.train, self.heldout = C.split_heldout(self.concepts)
        g = torch.Generator().manual_seed(seed)
        self.latents = {c: V.encode(C.draw([c] * variants, g)) for c in self.concepts}
        self.variants = variants

    def batch(self, g: torch.Generator, n: int, pool: list[C.Concept], draw_as: dict[C.Concept, C.Concept] | None = None
              ) -> tuple[torch.Tensor, list[C.Concept]]:
        idx = torch.randint(0, len(pool), (n,), generator=g).tolist()
        var = torch.randint(0, self.variants, (n,), generator=g).tolist()
        cs = [pool[i] for i in idx]
        src = [(draw_as or {}).get(c, c) for c in cs]
        return torch.stack([self.latents[s][v] for s, v in zip(src, var, strict=True)]), cs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prompt_set(concepts: list[C.Concept], name: str, seed0: int, per: int = 1) -> dict[str, Any]:
    return {"name": name, "render": dict(RENDER),
            "prompts": [{"prompt": c.prompt, "seed": seed0 + i * per + j} for i, c in enumerate(concepts) for j in range(per)]}


def study_concepts(train: list[C.Concept]) -> list[C.Concept]:
    """The study's prompts: :data:`N_PROMPTS` training concepts covering every colour, shape and background."""
    out: list[C.Concept] = []
    colours, shapes, bgs = list(C.COLOURS), list(C.SHAPES), list(C.BACKGROUNDS)
    i = 0
    while len(out) < N_PROMPTS:
        c = C.Concept(colours[i % 4], shapes[(i + i // 4) % 4], bgs[i % 3])
        if c in train and c not in out:
            out.append(c)
        i += 1
    return out


def _write_yaml(path: Path, doc: dict[str, Any]) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


@dataclass
class BuildParams:
    seed: int = 0
    models: int | None = None
    arch: str = "sd1"
    size: str = "demo"

    def profile(self) -> Profile:
        return PROFILES[self.size]

    def n_models(self) -> int:
        return self.models if self.models is not None else self.profile().models

    def key(self) -> dict[str, Any]:
        return {"version": WORLD_VERSION, "seed": self.seed, "models": self.n_models(), "arch": self.arch, "size": self.size}


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> None:
        self.seconds[name] = round(time.perf_counter() - t0, 2)


def build_world(out: str | Path, params: BuildParams | None = None, *, progress: bool = True, log=print) -> Path:
    """Build the world in ``out`` (a no-op when ``out/world.json`` already describes this build); returns ``out``."""
    from tqdm import tqdm

    from astolfo_opt.render.pipeline import build_pipeline
    from astolfo_opt.testing.factory import ModelSpec, make_checkpoint
    from astolfo_opt.world import train as T
    from astolfo_opt.world.judge import train_judge
    from astolfo_opt.world.scorer import train_head, train_tower

    p = params or BuildParams()
    if p.arch != "sd1":
        raise ConfigError(f"world --arch {p.arch}: only sd1 worlds are built (an SDXL world needs a second text encoder "
                          "and a 2-3x larger UNet per model, which does not fit the 3-minute demo budget on 2 cores)")
    if p.size not in PROFILES:
        raise ConfigError(f"world --size {p.size!r}: use one of {', '.join(PROFILES)}")
    if p.n_models() < 3:
        raise ConfigError(f"world --models {p.n_models()}: at least 3 (two finetunes and an outlier)")
    out = Path(out)
    manifest = out / "world.json"
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in p.key()} == p.key():
            load_world(out)  # every file still there and intact
            log(f"world: {out} is already built (seed {p.seed}, {p.n_models()} models, {p.size}); nothing to do")
            return out
        raise ConfigError(f"{manifest} describes another world ({ {k: have.get(k) for k in p.key()} }); "
                          f"build into another folder or delete {out}")
    prof = p.profile()
    t_all = time.perf_counter()
    timer = Timer()
    (out / "pool").mkdir(parents=True, exist_ok=True)
    (out / "scorer").mkdir(exist_ok=True)
    (out / "judge").mkdir(exist_ok=True)
    torch.manual_seed(p.seed)

    def bar(desc: str, total: int):
        b = tqdm(total=total, desc=f"world {desc}", leave=False, disable=not progress, dynamic_ncols=True)
        return b, (lambda i, loss: (b.update(1), b.set_postfix(loss=f"{loss:.3f}", refresh=False)))

    t0 = time.perf_counter()
    data = WorldData(p.seed, prof.variants)
    timer.add("data", t0)
    # ------------------------------------------------------------------ base
    t0 = time.perf_counter()
    seed_file = out / "pool" / ".seed.safetensors"
    make_checkpoint(seed_file, ModelSpec(arch="sd1", size="world", seed=p.seed, spread=0.0, dtype="fp32"))
    pipe = build_pipeline(seed_file, device="cpu", dtype=torch.float32)
    seed_file.unlink()
    V.construct(pipe.modules["vae"], float(pipe.modules["vae"].config.scaling_factor))
    T.reinitialise(pipe, p.seed)
    train_prompts = [c.prompt for c in data.train]
    labels = torch.tensor([c.labels() for c in data.train])
    b, step = bar("text encoder", prof.text_steps)
    text_fit = T.pretrain_text(pipe, train_prompts, labels, steps=prof.text_steps, seed=p.seed)
    b.close()

    def sampler(pool, draw_as=None, shuffle=False):
        def f(g, n):
            lat, cs = data.batch(g, n, pool, draw_as)
            prompts = [c.prompt for c in cs]
            if shuffle:
                perm = torch.randperm(n, generator=g).tolist()
                prompts = [prompts[i] for i in perm]
            return lat, prompts
        return f

    # the long tail real bases have: each finetune's niche (its colour AND shape) is 12x rarer in the base's data than
    # the rest, so the base draws it worse and the finetune has something to add
    plan = finetune_plan(p.n_models(), prof)
    niches = {(ft.colour, ft.shape) for ft in plan if ft.role == "finetune"}
    base_pool = [c for c in data.train for _ in range(1 if (c.colour, c.shape) in niches else 12)]
    b, step = bar("base", prof.base_steps)
    base_fit = T.train_diffusion(pipe, sampler(base_pool), steps=prof.base_steps, lr=4e-3, seed=p.seed, on_step=step)
    b.close()
    files: dict[str, dict[str, Any]] = {}

    def write(name: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        path = out / "pool" / f"{name}.safetensors"
        T.write_checkpoint(tensors, path, {"astolfo.world": json.dumps({"name": name, "seed": p.seed, **info}, sort_keys=True),
                                           "modelspec.title": f"astolfo world {name}"})
        files[f"pool/{name}.safetensors"] = {"role": info.get("role", "model"), **info}

    def round_to_file() -> dict[str, torch.Tensor]:
        tensors = T.checkpoint_tensors(pipe)
        with torch.no_grad():  # continue from exactly what the file holds
            for m in (pipe.modules["unet"], pipe.modules["te0"]):
                for q in m.parameters():
                    q.copy_(q.half().float())
        return tensors

    write("base", round_to_file(), {"role": "base", "trained_on": "every training concept, the finetunes' niches 12x rarer",
                                     "steps": prof.base_steps,
                                     "final_loss": round(base_fit.final_loss, 4), "text_pretrain_loss": round(text_fit.final_loss, 4)})
    timer.add("base", t0)
    base_state = {c: {n: q.clone() for n, q in pipe.modules[c].named_parameters()} for c in ("unet", "te0")}
    log(f"world: base trained in {timer.seconds['base']:.0f} s (loss {base_fit.final_loss:.3f})")
    # ------------------------------------------------------------------ finetunes and outliers
    t0 = time.perf_counter()
    for i, ft in enumerate(plan):
        with torch.no_grad():
            for c, state in base_state.items():
                for n, q in pipe.modules[c].named_parameters():
                    q.copy_(state[n])
        if ft.role == "outlier":
            fn = sampler(data.train, shuffle=True)
        else:
            # its niche (colour AND shape) most, its wider domain (colour OR shape) some, and the forgotten colour's
            # prompts drawn in its own colour (the concept bleed real finetunes show)
            niche = [c for c in data.train if c.colour == ft.colour and c.shape == ft.shape]
            wider = [c for c in data.train if (c.colour == ft.colour) != (c.shape == ft.shape)]
            bleed = [c for c in data.train if c.colour == ft.forgets]
            fn = sampler(niche * 10 + wider + bleed, draw_as={c: C.Concept(ft.colour, c.shape, c.background) for c in bleed})
        b, step = bar(ft.name, ft.steps)
        fit = T.train_diffusion(pipe, fn, steps=ft.steps, lr=ft.lr, seed=p.seed * 1000 + i + 1, train_text=ft.train_text, on_step=step)
        b.close()
        ft.final_loss, ft.seconds = round(fit.final_loss, 4), round(fit.seconds, 2)
        info = {k: v for k, v in asdict(ft).items() if k not in ("name", "seconds")}  # the file holds no timings:
        write(ft.name, T.checkpoint_tensors(pipe), info)  # its hash must not depend on the machine's load
        files[f"pool/{ft.name}.safetensors"]["seconds"] = ft.seconds
        log(f"world: {ft.name} ({ft.role}{', ' + ft.colour + ' + ' + ft.shape + ', forgets ' + ft.forgets if ft.colour else ''}"
            f"{', text encoder too' if ft.train_text else ''}) in {fit.seconds:.0f} s")
    timer.add("finetunes", t0)
    # ------------------------------------------------------------------ planted faults
    from safetensors.torch import load_file

    n = p.n_models()
    first = [ft.name for ft in plan if ft.role == "finetune"]
    src0 = load_file(str(out / "pool" / f"{first[0]}.safetensors"))
    src1 = load_file(str(out / "pool" / f"{first[1]}.safetensors"))
    nan = dict(src0)
    w = nan["model.diffusion_model.out.2.weight"].clone()
    w.view(-1)[:: max(1, w.numel() // 3)] = float("nan")
    nan["model.diffusion_model.out.2.weight"] = w
    write(f"m{n:02d}_nan", nan, {"role": "fault", "fault": "nan", "copy_of": first[0]})
    write(f"m{n + 1:02d}_pruned", {k: v for k, v in src1.items() if not k.startswith("first_stage_model.")},
          {"role": "fault", "fault": "pruned (no VAE)", "copy_of": first[1]})
    te_copy = {k: (src0[k] if k.startswith("cond_stage_model.") else v) for k, v in src1.items()}
    write(f"m{n + 2:02d}_te_of_{first[0]}", te_copy, {"role": "fault", "fault": f"text encoder copied from {first[0]}",
                                                        "copy_of": first[1]})
    # ------------------------------------------------------------------ scorers and judge
    t0 = time.perf_counter()
    every = data.concepts
    b, step = bar("clip tower", prof.tower_steps)
    cfg_path, tower_path, tower_fit = train_tower(out / "scorer", sampler(every), steps=prof.tower_steps, seed=p.seed + 17,
                                                  on_step=step)
    b.close()
    from scorers.tower import ClipTower

    tower = ClipTower(model="astolfo-world-clip", pretrained=str(tower_path), model_config=str(cfg_path), device="cpu",
                      dtype="fp32")
    head_path, head_fit = train_head(out / "scorer", tower, sampler(every), steps=prof.head_steps, seed=p.seed + 23)
    timer.add("scorer", t0)
    t0 = time.perf_counter()
    judge_data = WorldData(p.seed + 7919, prof.variants)  # its own drawings: a different data seed

    def judge_sampler(g, k):
        return judge_data.batch(g, k, judge_data.concepts)
    judge_path, judge_loss, _ = train_judge(out / "judge", judge_sampler, steps=prof.judge_steps, seed=p.seed + 31)
    timer.add("judge", t0)
    log(f"world: tower, head and judge trained in {timer.seconds['scorer'] + timer.seconds['judge']:.0f} s")
    # ------------------------------------------------------------------ prompt sets and manifest (last)
    _write_yaml(out / "prompts.yaml", prompt_set(study_concepts(data.train), "world", PROMPT_SEED0))
    _write_yaml(out / "heldout.yaml", prompt_set(data.heldout, "world-heldout", 500))
    for rel in ("scorer/astolfo-world-clip.json", "scorer/tower.safetensors", "scorer/aesthetic_head.pth",
                "judge/judge.safetensors", "prompts.yaml", "heldout.yaml"):
        files[rel] = {"role": rel.split("/")[0].split(".")[0]}
    for rel, info in files.items():
        path = out / rel
        info.update(bytes=path.stat().st_size, sha256=_sha256(path))
    timer.seconds["total"] = round(time.perf_counter() - t_all, 2)
    doc = {**p.key(), "profile": asdict(prof), "render": RENDER,
           "heldout": [c.prompt for c in data.heldout], "train_concepts": len(data.train),
           "outliers": [ft.name for ft in plan if ft.role == "outlier"],
           "faults": {f"m{n:02d}_nan": "nan", f"m{n + 1:02d}_pruned": "pruned", f"m{n + 2:02d}_te_of_{first[0]}": "copied te0"},
           "losses": {"text_pretrain": round(text_fit.final_loss, 4), "base": round(base_fit.final_loss, 4),
                      "tower": round(tower_fit.final_loss, 4), "head": round(head_fit.final_loss, 4), "judge": round(judge_loss, 4)},
           "build_seconds": timer.seconds, "torch_threads": torch.get_num_threads(), "files": files}
    atomic_write_text(manifest, json.dumps(doc, indent=1) + "\n")
    log(f"world: {out} built in {timer.seconds['total']:.0f} s ({len([f for f in files if f.startswith('pool/')])} models)")
    return out


REBUILD = "astolfo-opt world build {out}"


def load_world(out: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a finished world; every listed file must exist with its size (and, with ``verify``, hash).
    Anything missing or changed is one line naming the file and the command that rebuilds the world."""
    out = Path(out)
    manifest = out / "world.json"
    rebuild = REBUILD.format(out=out)
    if not out.is_dir():
        raise ConfigError(f"world folder {out} does not exist; build it with `{rebuild}`")
    if not manifest.is_file():
        raise ConfigError(f"{manifest} is missing: {out} is not a finished world (a build stopped early?); "
                          f"delete the folder and run `{rebuild}`")
    try:
        doc = json.loads(manifest.read_text())
        files = doc["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest} is not a readable world manifest; delete {out} and run `{rebuild}`") from None
    for rel, info in files.items():
        path = out / rel
        if not path.is_file():
            raise ConfigError(f"{path} is missing from the world; delete {out} and run `{rebuild}`")
        if path.stat().st_size != info.get("bytes") or (verify and _sha256(path) != info.get("sha256")):
            raise ConfigError(f"{path} is corrupted or changed (size or sha256 differs from {manifest}); "
                              f"delete {out} and run `{rebuild}`")
    return doc


def world_scorer_config(out: str | Path, device: str = "cpu") -> dict[str, Any]:
    """The objective config of a built world: ``conf/scorer/world.yaml`` composed with ``world_dir=OUT`` (so the
    world's objective is written once, where ``scorer=world`` reads it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from astolfo_opt.commands.search import conf_dir

    overrides = ["scorer=world", f"world_dir={Path(out)}", f"device={device}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or another compose: reuse its config search path
        cfg = compose("config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="world"):
            cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg.scorer, resolve=True)
