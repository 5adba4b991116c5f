"""Labelled image grids (PNG) for people: which prompt, seed and trial / recipe produced each picture.

Why labels inside the image: a grid is uploaded as an Optuna artifact and opened on its own in the dashboard, far
from any table, so it has to carry its own captions. Small renders (the 64 px tiny models) are upscaled with
nearest-neighbour so captions stay readable and pixels stay honest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 192  # px: narrower images are upscaled (integer factor, nearest) so a caption line fits some words
PAD = 6
BG, FG, TITLE_BG = (255, 255, 255), (20, 20, 20), (235, 235, 235)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _wrap_line(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of one paragraph to ``width`` px; words longer than a line are cut."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        cand = f"{line} {word}" if line else word
        if draw.textlength(cand, font=font) <= width:
            line = cand
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    lines.append(line)
    return lines


def _ellipsis(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 5) -> list[str]:
    """Wrap a caption to at most ``max_lines`` lines. The first paragraph (the prompt) is shortened first, so the
    later ones (seed, trial / recipe id) stay whole: they are what identifies the picture."""
    paras = [_wrap_line(draw, p, font, width) for p in (str(text).splitlines() or [""])]
    head, tail = paras[0], [line for p in paras[1:] for line in p]
    if len(tail) >= max_lines:  # metadata alone overflows: keep its first lines
        tail = tail[: max_lines - 1] + [_ellipsis(draw, tail[max_lines - 1], font, width)]
        return tail
    room = max_lines - len(tail)
    if len(head) > room:
        head = head[: room - 1] + [_ellipsis(draw, head[room - 1], font, width)]
    return head + tail


def make_grid(images: Sequence[Image.Image], labels: Sequence[str], title: str | None = None, *, cols: int | None = None,
              max_label_lines: int = 5) -> Image.Image:
    """One RGB image: ``images`` in a grid (``cols`` default ~sqrt(n), max 4), each with its label below, and an
    optional title bar. Labels may hold several lines (``\\n``); they are wrapped to the cell width."""
    images = list(images)
    labels = list(labels)
    if not images:
        raise ValueError("make_grid needs at least one image")
    if len(labels) != len(images):
        raise ValueError(f"make_grid: {len(images)} images but {len(labels)} labels")
    w0 = max(im.width for im in images)
    h0 = max(im.height for im in images)
    scale = max(1, math.ceil(MIN_CELL / w0))
    cw, ch = w0 * scale, h0 * scale
    cols = cols or min(4, max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / cols)
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag|", font=font)[3]) + 2
    wrapped = [_wrap(probe, lab, font, cw - 2, max_label_lines) for lab in labels]
    label_h = line_h * max(len(w) for w in wrapped) + PAD
    title_lines = _wrap(probe, title, _font(14), cols * (cw + PAD) - 2 * PAD, 2) if title else []
    title_h = (len(title_lines) * (line_h + 2) + PAD) if title else 0
    grid = Image.new("RGB", (cols * (cw + PAD) + PAD, title_h + rows * (ch + label_h + PAD) + PAD), BG)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.rectangle((0, 0, grid.width, title_h), fill=TITLE_BG)
        for i, line in enumerate(title_lines):
            draw.text((PAD, PAD // 2 + i * (line_h + 2)), line, fill=FG, font=_font(14))
    for i, (im, lines) in enumerate(zip(images, wrapped, strict=True)):
        r, c = divmod(i, cols)
        x = PAD + c * (cw + PAD)
        y = title_h + PAD + r * (ch + label_h + PAD)
        cell = im.convert("RGB")
        if scale > 1 or cell.size != (cw, ch):
            cell = cell.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        grid.paste(cell, (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 1, y + ch + 2 + j * line_h), line, fill=FG, font=font)
    return grid


def label(prompt: str, seed: int, trial: str | int | None = None) -> str:
    """The standard caption: prompt, then ``seed N`` and the trial / recipe id."""
    tail = f"seed {seed}" + (f" | {trial}" if trial not in (None, "") else "")
    return f"{prompt}\n{tail}"
