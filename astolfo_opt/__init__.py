"""astolfo-opt: automatic search for good Stable Diffusion model merges."""

__version__ = "0.1.0"
