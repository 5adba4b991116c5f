"""Fixed prompt sets (YAML data files): every trial renders the same prompts with the same seeds, so score
differences come from the weights, not from sampling noise.

Format: a top-level ``prompts:`` list of ``{prompt, negative, seed}`` (a bare string is a prompt whose seed is its
index); optional ``name:``; optional ``render:`` mapping of ``width``, ``height``, ``steps``, ``guidance_scale``,
``scheduler`` (the :class:`~astolfo_opt.render.settings.RenderSettings` fields), so a set made for one size or sampler
carries it: ``astolfo-opt render`` takes them as its defaults. Shipped sets live in ``astolfo_opt/render/prompt_sets/``
and can be named instead of a path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from astolfo_opt.errors import ConfigError, MissingFileError
from astolfo_opt.render.settings import RenderSettings


@dataclass(frozen=True)
class Prompt:
    prompt: str
    negative: str = ""
    seed: int = 0


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt]
    name: str
    #: sha256 over the prompts, negatives and seeds (not the name): a study records it so its scores stay comparable
    hash: str
    #: render settings the set was made for (a subset of RENDER_KEYS, validated); not in ``hash``, so adding them
    #: keeps a set's recorded scores comparable
    render: dict[str, Any] = field(default_factory=dict)


#: the RenderSettings fields a prompt set's ``render:`` section may set (the rest belong to the run, not the set)
RENDER_KEYS = ("width", "height", "steps", "guidance_scale", "scheduler")


def shipped_prompt_sets() -> list[str]:
    folder = resources.files("astolfo_opt.render").joinpath("prompt_sets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_prompt_set(ref: str | Path, config_key: str = "render.prompt_set") -> Path:
    """A YAML path, or the name of a shipped set (``default``, ``tiny``, ``heldout``)."""
    p = Path(str(ref)).expanduser()
    if p.is_file():
        return p
    shipped = resources.files("astolfo_opt.render").joinpath("prompt_sets", f"{ref}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    if p.suffix in (".yaml", ".yml") or "/" in str(ref):
        raise MissingFileError(p, config_key, "prompt set")
    raise ConfigError(f"prompt set {ref!r} not found: give a YAML path or a shipped set name "
                      f"({', '.join(shipped_prompt_sets())}) with {config_key}=...")


def prompt_set_hash(prompts: list[Prompt]) -> str:
    return hashlib.sha256(json.dumps([asdict(p) for p in prompts], sort_keys=True).encode()).hexdigest()


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read and validate a prompt set; errors name the file and the entry."""
    path = resolve_prompt_set(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a readable YAML prompt set ({type(e).__name__}); "
                          "see astolfo_opt/render/prompt_sets/default.yaml for the format") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise ConfigError(f"{path}: needs a top-level `prompts:` list of {{prompt, negative, seed}} entries")
    out = []
    for i, item in enumerate(data["prompts"]):
        if isinstance(item, str):
            item = {"prompt": item, "seed": i}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise ConfigError(f"{path}: prompts[{i}] needs a non-empty `prompt` string")
        unknown = set(item) - {"prompt", "negative", "seed"}
        if unknown:
            raise ConfigError(f"{path}: prompts[{i}] has unknown field(s) {', '.join(sorted(unknown))} (use prompt, negative, seed)")
        seed = item.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ConfigError(f"{path}: prompts[{i}].seed={seed!r} must be a non-negative integer")
        neg = item.get("negative") or ""
        if not isinstance(neg, str):
            raise ConfigError(f"{path}: prompts[{i}].negative must be a string")
        out.append(Prompt(item["prompt"], neg, seed))
    name = str(data.get("name") or path.stem)
    return PromptSet(out, name, prompt_set_hash(out), _render_section(path, data.get("render")))


def _render_section(path: Path, section: Any) -> dict[str, Any]:
    """The validated ``render:`` mapping (empty when absent). Values are checked by building RenderSettings from
    them, so a bad set fails when loaded, not halfway through a study."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: `render:` must be a mapping of {', '.join(RENDER_KEYS)}")
    unknown = sorted(set(map(str, section)) - set(RENDER_KEYS))
    if unknown:
        raise ConfigError(f"{path}: render: has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(RENDER_KEYS)})")
    flags = sorted(k for k, v in section.items() if isinstance(v, bool))
    if flags:
        raise ConfigError(f"{path}: render.{flags[0]} must be a number or name, not a boolean")
    try:
        RenderSettings(**section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return dict(section)
