"""The world's autoencoder, constructed rather than trained: encode = 8x8 average pooling, decode = nearest upsampling.

Why constructed: training even the tiny VAE costs ~1.5 s per step on two cores, and the world's images (flat colours
on flat backgrounds) need no learned codec. The weights below make diffusers' ``AutoencoderKL`` (the SD1 module tree,
every key name real) compute exactly that:

* every ResNet block's second convolution and every attention output projection are zero, so each block is the
  identity (or its 1x1 shortcut, which here moves channels);
* each downsampler averages its 2x2 window; each upsampler's convolution is the identity after nearest upsampling;
* the one normalisation that cannot be bypassed (``conv_norm_out``, GroupNorm) sees, per group, the channels
  ``(s, -s, K, -K)`` for one signal ``s`` and a large constant ``K``: the group mean is exactly 0 and its variance is
  ``K^2`` up to ``s^2/K^2`` (5e-5 here), so the normalised signal is ``s`` times a known constant, which the
  affine weight undoes; a bias of 12 keeps the following SiLU linear to 7e-5.

Latent channels 0-2 carry the pooled RGB times :data:`LATENT_GAIN` (about unit scale after the SD scaling factor,
as diffusion training expects); channel 3 is zero. :func:`encode` / :func:`decode` are the same maps in plain torch,
for making training data fast; a test checks they equal the module's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

K = 100.0  # the constant channel
BIAS = 12.0  # keeps SiLU(x + BIAS) == x + BIAS to ~7e-5
LATENT_GAIN = 3.0  # latents (after the scaling factor) = LATENT_GAIN * pooled pixels in [-1, 1]
GROUPS = 4


def _slot(c: int, j: int, k: int) -> int:
    """Channel of signal ``j`` (0-3), role ``k`` (0: s, 1: -s, 2: K, 3: -K) in a ``c``-channel tensor: one signal per
    GroupNorm group, so the output norm's statistics are the constants'."""
    return j * (c // GROUPS) + k


def _remap(w: torch.Tensor, c_out: int, c_in: int, taps: list[tuple[int, int]], value: float = 1.0) -> None:
    for j in range(GROUPS):
        for k in range(4):
            for y, x in taps:
                w[_slot(c_out, j, k), _slot(c_in, j, k), y, x] = value


def _signals_in(conv: torch.nn.Conv2d, c_out: int, n_in: int, gain: float) -> None:
    """A centre-tap convolution from ``n_in`` plain channels into the slot layout, constants in the bias."""
    w, b = conv.weight, conv.bias
    for j in range(min(n_in, 3)):
        w[_slot(c_out, j, 0), j, 1, 1] = gain
        w[_slot(c_out, j, 1), j, 1, 1] = -gain
    for j in range(GROUPS):
        b[_slot(c_out, j, 2)] = K
        b[_slot(c_out, j, 3)] = -K


def _norm_out(norm: torch.nn.GroupNorm, c: int) -> None:
    """Undo the group normalisation of each signal (group variance = K^2 * 2 / group size) and add BIAS."""
    sigma = K * math.sqrt(2 / (c // GROUPS))
    for j in range(3):
        norm.weight[_slot(c, j, 0)] = sigma
        norm.bias[_slot(c, j, 0)] = BIAS


def _shortcuts(blocks: list) -> None:
    """Each ResNet block is the identity already (its second conv is zero); where it changes the channel count,
    its 1x1 shortcut carries the slot layout across."""
    for block in blocks:
        for res in block.resnets:
            if res.conv_shortcut is not None:
                _remap(res.conv_shortcut.weight, res.conv_shortcut.out_channels, res.conv_shortcut.in_channels, [(0, 0)])


def construct(vae: torch.nn.Module, scaling_factor: float) -> torch.nn.Module:
    """Set every parameter of a diffusers ``AutoencoderKL`` (the world's config: 4 levels, GroupNorm of 4 groups)
    in place; returns it. Deterministic: every world model carries the same VAE bit for bit."""
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.zero_()
            if name.endswith("weight") and p.ndim == 1:  # every norm's scale
                p.fill_(1.0)
        enc, dec = vae.encoder, vae.decoder
        c0 = enc.conv_in.out_channels
        _signals_in(enc.conv_in, c0, 3, 1.0)
        for block in enc.down_blocks:
            _shortcuts([block])
            for ds in block.downsamplers or []:
                c = ds.conv.out_channels
                _remap(ds.conv.weight, c, c, [(0, 0), (0, 1), (1, 0), (1, 1)], 0.25)  # pad (0,1,0,1), stride 2: 2x2 mean
        _shortcuts([enc.mid_block])
        c_top = enc.conv_norm_out.num_channels
        _norm_out(enc.conv_norm_out, c_top)
        gain = LATENT_GAIN / scaling_factor
        for j in range(3):
            enc.conv_out.weight[j, _slot(c_top, j, 0), 1, 1] = gain
            enc.conv_out.bias[j] = -BIAS * gain
        z = enc.conv_out.out_channels // 2
        enc.conv_out.bias[z:] = -20.0  # log-variance: std e^-10, so sampling equals the mean
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is not None:
                n = conv.out_channels
                conv.weight[:, :, 0, 0] = torch.eye(n)
        c_mid = dec.conv_in.out_channels
        _signals_in(dec.conv_in, c_mid, 3, scaling_factor / LATENT_GAIN)
        _shortcuts([dec.mid_block])
        for block in dec.up_blocks:
            _shortcuts([block])
            for us in block.upsamplers or []:
                c = us.conv.out_channels
                _remap(us.conv.weight, c, c, [(1, 1)])
        c_last = dec.conv_norm_out.num_channels
        _norm_out(dec.conv_norm_out, c_last)
        for j in range(3):
            dec.conv_out.weight[j, _slot(c_last, j, 0), 1, 1] = 1.0
            dec.conv_out.bias[j] = -BIAS
    return vae


def encode(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` pixels in [-1, 1] -> ``[N, 4, H/8, W/8]`` latents as the UNet sees them (scaling factor applied)."""
    pooled = F.avg_pool2d(images, 8) * LATENT_GAIN
    return torch.cat([pooled, torch.zeros_like(pooled[:, :1])], dim=1)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaling factor applied) -> pixels in [-1, 1] (unclamped), nearest upsampling by 8."""
    return F.interpolate(latents[:, :3] / LATENT_GAIN, scale_factor=8, mode="nearest")
