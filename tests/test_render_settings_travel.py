"""Settings that travel with their data: a prompt set's ``render:`` section becomes ``astolfo-opt render``'s defaults
(flags still win, the set's hash stays over prompts only), render.json says which prompt each file came from, and an
aesthetic head of any input width loads and must match its tower's embedding width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from astolfo_opt.cli import main
from astolfo_opt.errors import ConfigError
from astolfo_opt.render.prompts import load_prompt_set
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint
from scorers import clear_cache
from scorers.laion_aesthetic import AestheticHead, LaionAesthetic, load_head
from scorers.testing import TINY_CLIP_NAME, make_tiny_clip

PROMPTS = """prompts:
  - {prompt: a cat on a sofa, negative: blurry, seed: 7}
  - {prompt: a red car, seed: 3}
"""
RENDER = """render:
  width: 32
  height: 64
  steps: 1
  guidance_scale: 3.0
  scheduler: ddim
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Resident towers / heads from other tests must not leak into these (and ours must not leak out)."""
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------------------------------- prompt set render:
def test_prompt_set_render_section_loads_and_keeps_the_hash(tmp_path):
    plain = load_prompt_set(_write(tmp_path / "plain.yaml", PROMPTS))
    with_render = load_prompt_set(_write(tmp_path / "sized.yaml", PROMPTS + RENDER))
    assert plain.render == {}
    assert with_render.render == {"width": 32, "height": 64, "steps": 1, "guidance_scale": 3.0, "scheduler": "ddim"}
    assert with_render.hash == plain.hash  # the hash covers prompts, negatives and seeds only


@pytest.mark.parametrize(("section", "needle"), [
    ("render:\n  sampler: ddim\n", "sampler"),
    ("render:\n  clip_skip: 1\n", "clip_skip"),
    ("render:\n  width: 30\n", "render.width"),
    ("render:\n  scheduler: nope\n", "render.scheduler"),
    ("render:\n  steps: true\n", "render.steps"),
    ("render: [512]\n", "mapping"),
])
def test_prompt_set_bad_render_section_is_a_one_line_error(tmp_path, section, needle):
    path = _write(tmp_path / "bad.yaml", PROMPTS + section)
    with pytest.raises(ConfigError) as e:
        load_prompt_set(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and needle in msg
    if needle in ("sampler", "clip_skip"):
        assert "width, height, steps, guidance_scale, scheduler" in msg


# ------------------------------------------------------------------------------------------- astolfo-opt render
def test_render_command_takes_the_sets_settings_and_flags_win(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors", ModelSpec(spread=0.0))
    prompts = _write(tmp_path / "sized.yaml", PROMPTS + RENDER)
    out = tmp_path / "out"
    assert main(["render", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--device", "cpu"]) == 0
    meta = json.loads((out / "render.json").read_text())
    s = meta["settings"]
    assert (s["width"], s["height"], s["steps"], s["guidance_scale"], s["scheduler"]) == (32, 64, 1, 3.0, "ddim")
    assert len(meta["prompts"]) == len(meta["files"]) == 2
    assert meta["prompts"] == [{"prompt": "a cat on a sofa", "negative": "blurry", "seed": 7},
                               {"prompt": "a red car", "negative": "", "seed": 3}]
    assert [f.split("_")[1] for f in meta["files"]] == ["s7", "s3"]

    out2 = tmp_path / "out2"
    assert main(["render", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out2), "--device", "cpu",
                 "--steps", "2", "--scheduler", "euler", "--limit", "1"]) == 0
    meta2 = json.loads((out2 / "render.json").read_text())
    s2 = meta2["settings"]
    assert (s2["steps"], s2["scheduler"], s2["width"], s2["height"]) == (2, "euler", 32, 64)
    assert meta2["prompts"] == [{"prompt": "a cat on a sofa", "negative": "blurry", "seed": 7}]


# ------------------------------------------------------------------------------------------- aesthetic head width
def _head(path: Path, width: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(AestheticHead(width).state_dict(), path)
    return path


def test_head_width_is_read_from_the_state_dict(tmp_path):
    ref = AestheticHead(64)
    torch.save(ref.state_dict(), tmp_path / "h64.pth")
    head = load_head(tmp_path / "h64.pth")
    assert head.input_dim == 64 and not head.training
    x = torch.nn.functional.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        got = head(x)
        want = ref.eval()(x)
    assert got.shape == (5,)
    torch.testing.assert_close(got, want)


def test_head_width_must_match_the_tower(tmp_path):
    tower = make_tiny_clip(tmp_path / "clip", seed=0)  # 768-d embeddings
    head = _head(tmp_path / "h64.pth", 64)
    with pytest.raises(ConfigError) as e:
        LaionAesthetic(head=str(head), model=TINY_CLIP_NAME, pretrained=str(tower), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "64-d" in msg and "768-d" in msg and "trained on that tower" in msg
    # a head of the tower's width is accepted
    ok = LaionAesthetic(head=str(_head(tmp_path / "h768.pth", 768)), model=TINY_CLIP_NAME, pretrained=str(tower),
                        device="cpu")
    assert ok.head.input_dim == ok.tower.embed_dim == 768
