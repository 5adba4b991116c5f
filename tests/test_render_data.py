"""Renderer data: tokenizer files from open_clip's BPE, shipped configs, prompt sets, settings, grids and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from astolfo_opt.cli import main
from astolfo_opt.errors import ConfigError, MissingFileError
from astolfo_opt.render.grid import label, make_grid
from astolfo_opt.render.make_configs import CONFIG_ROOT, all_config_files, text_config, unet_config
from astolfo_opt.render.prompts import Prompt, load_prompt_set, shipped_prompt_sets
from astolfo_opt.render.settings import SCHEDULERS, RenderSettings, parse_size
from astolfo_opt.render.tokenizer import BOS_ID, EOS_ID, load_tokenizer, vocab_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pad,pad_id", [("eos", EOS_ID), ("bang", 0)])
def test_tokenizer_from_open_clip_bpe(pad, pad_id):
    tok = load_tokenizer(pad)
    assert tok.convert_tokens_to_ids(["a</w>", "this</w>", "<|startoftext|>", "<|endoftext|>"]) == [320, 589, BOS_ID, EOS_ID]
    ids = tok("A this", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [BOS_ID, 320, 589, EOS_ID] and ids[4:] == [pad_id] * 73
    assert len(tok) == 49408
    vocab = json.loads((vocab_dir() / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["!</w>"] == 256
    assert not any(p.name == "vocab.json" for p in CONFIG_ROOT.rglob("*"))  # never shipped, generated


def test_shipped_configs_are_in_sync_with_the_generator():
    want = all_config_files()
    have = {str(p.relative_to(CONFIG_ROOT)): p.read_text() for p in CONFIG_ROOT.rglob("*") if p.is_file()}
    assert have == want, "run: python -m astolfo_opt.render.make_configs"


def test_config_values_full_and_tiny():
    sdxl = unet_config("sdxl", "full", 128)
    assert sdxl["cross_attention_dim"] == 2048 and sdxl["projection_class_embeddings_input_dim"] == 2816
    assert sdxl["transformer_layers_per_block"] == [1, 2, 10] and sdxl["attention_head_dim"] == [5, 10, 20]
    tiny = unet_config("sdxl", "tiny", 128)
    assert tiny["cross_attention_dim"] == 96 and tiny["projection_class_embeddings_input_dim"] == 112 == 64 + 6 * 8
    assert unet_config("sd1", "tiny", 64)["block_out_channels"] == [32, 64, 128, 128]
    assert unet_config("sd2", "full", 96)["attention_head_dim"] == [5, 10, 20, 20]
    assert text_config("sd2", "full", "te0")["num_hidden_layers"] == 23 and text_config("sd2", "tiny", "te0")["num_hidden_layers"] == 23
    assert text_config("sd1", "tiny", "te0")["hidden_size"] == 32 and text_config("sdxl", "tiny", "te1")["hidden_size"] == 64
    sched = {v: json.loads((CONFIG_ROOT / v / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
             for v in ("sd2-v", "sd2-eps", "sd1", "sdxl", "sdxl-v", "sdxl-v-tiny")}
    assert sched == {"sd2-v": "v_prediction", "sd2-eps": "epsilon", "sd1": "epsilon", "sdxl": "epsilon", "sdxl-v": "v_prediction",
                     "sdxl-v-tiny": "v_prediction"}
    pads = {(v, t): json.loads((CONFIG_ROOT / v / t / "special_tokens_map.json").read_text())["pad_token"]
            for v, t in (("sd1", "tokenizer"), ("sd2-v", "tokenizer"), ("sdxl", "tokenizer"), ("sdxl", "tokenizer_2"))}
    assert pads == {("sd1", "tokenizer"): "<|endoftext|>", ("sd2-v", "tokenizer"): "!", ("sdxl", "tokenizer"): "<|endoftext|>",
                    ("sdxl", "tokenizer_2"): "!"}


def test_shipped_prompt_sets():
    assert {"default", "tiny", "heldout"} <= set(shipped_prompt_sets())
    default, tiny, held = (load_prompt_set(n) for n in ("default", "tiny", "heldout"))
    assert len(default.prompts) == 8 and 2 <= len(tiny.prompts) <= 4 and len(held.prompts) >= 4
    assert len({p.seed for p in default.prompts}) == 8
    assert not {p.prompt for p in held.prompts} & {p.prompt for p in default.prompts}
    assert len({default.hash, tiny.hash, held.hash}) == 3


def test_prompt_set_validation_and_hash(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("prompts:\n  - {prompt: a cat, seed: 3}\n  - a dog\n")
    ps = load_prompt_set(f)
    assert ps.prompts == [Prompt("a cat", "", 3), Prompt("a dog", "", 1)] and ps.name == "mine"
    f2 = tmp_path / "other.yaml"
    f2.write_text("name: renamed\nprompts:\n  - {prompt: a cat, seed: 3}\n  - {prompt: a dog, seed: 1}\n")
    assert load_prompt_set(f2).hash == ps.hash  # content, not name
    f2.write_text("prompts:\n  - {prompt: a cat, seed: 4}\n  - {prompt: a dog, seed: 1}\n")
    assert load_prompt_set(f2).hash != ps.hash
    cases = [("prompts: []\n", "needs a top-level"), ("foo: 1\n", "needs a top-level"), ("prompts: [{prompt: x, seed: -1}]\n", "seed"),
             ("prompts: [{prompt: x, sede: 1}]\n", "unknown field"), ("prompts: [{prompt: ''}]\n", "non-empty"), ("a: [\n", "YAML")]
    for text, msg in cases:
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg) as e:
            load_prompt_set(f)
        assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MissingFileError, match="render.prompt_set"):
        load_prompt_set(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="shipped set name"):
        load_prompt_set("no_such_set")


def test_render_settings_and_hydra_group_files():
    for name in ("default", "tiny"):
        cfg = yaml.safe_load((ROOT / "conf" / "render" / f"{name}.yaml").read_text())
        assert {"prompt_set", "width", "height", "steps", "guidance_scale", "scheduler", "clip_skip", "batch_size"} <= set(cfg)
        s = RenderSettings.from_mapping(cfg)
        assert s.scheduler in SCHEDULERS and load_prompt_set(cfg["prompt_set"]).prompts
    assert RenderSettings.from_mapping(yaml.safe_load((ROOT / "conf/render/tiny.yaml").read_text())).width == 64
    for bad, msg in [({"width": 63}, "multiple of 8"), ({"steps": 0}, "steps"), ({"scheduler": "k_lms2"}, "unknown"),
                     ({"batch_size": 0}, "batch_size"), ({"clip_skip": -1}, "clip_skip")]:
        with pytest.raises(ConfigError, match=msg):
            RenderSettings(**bad)
    assert parse_size("512x768") == (512, 768) and parse_size("64") == (64, 64)
    with pytest.raises(ConfigError):
        parse_size("big")


def test_grid_has_labels_and_title():
    imgs = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    g = make_grid(imgs, [label("a red square", 1, "trial 3"), label("green " * 30, 2), "blue"], title="recipe abc123")
    a = np.asarray(g)
    assert g.mode == "RGB" and g.width >= 2 * 192
    assert (a[..., 0] > 200).sum() >= 192 * 192 and (a[..., 1] > 200).sum() >= 192 * 192  # upscaled cells
    dark = (a.sum(axis=2) < 150).sum()
    assert dark > 200  # captions and title are drawn
    bare = np.asarray(make_grid(imgs, ["", "", ""]))
    assert (bare.sum(axis=2) < 150).sum() < dark
    with pytest.raises(ValueError):
        make_grid(imgs, ["one"])
    # a long prompt is shortened, never the seed / trial line that identifies the picture
    from PIL import ImageDraw

    from astolfo_opt.render.grid import _font, _wrap

    lines = _wrap(ImageDraw.Draw(Image.new("RGB", (1, 1))), label("word " * 80, 5, "trial 7"), _font(12), 190, 5)
    assert len(lines) == 5 and lines[-1] == "seed 5 | trial 7" and lines[-2].endswith("...")


def test_cli_render_writes_pngs_grid_and_metadata(tiny_pools, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["render", "--checkpoint", str(tiny_pools["sd1"].base), "--prompts", "tiny", "--out", str(out), "--device", "cpu",
               "--steps", "1", "--limit", "2"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "grid.png" in pngs and len(pngs) == 3
    assert Image.open(next(out.glob("00_*.png"))).size == (64, 64)
    meta = json.loads((out / "render.json").read_text())
    assert meta["variant"] == "sd1" and meta["settings"]["steps"] == 1 and len(meta["files"]) == 2
    capsys.readouterr()
    assert main(["render", "--checkpoint", str(tiny_pools["sd2"].base), "--prompts", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--variant=sd2-v" in err and err.count("\n") == 1
    assert main(["render", "--checkpoint", str(tiny_pools["sd1"].base), "--prompts", str(tmp_path / "x.yaml"), "--out", str(out)]) == 2
    assert "--prompts" in capsys.readouterr().err
