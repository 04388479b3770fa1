"""The deterministic synthetic small-object data set (see :mod:`hmkd.data.synthetic.render`)."""

from .render import GENERATOR_VERSION, PRESETS, SHAPES, generate_synthetic, render_image, synthetic_exists

__all__ = ["PRESETS", "SHAPES", "GENERATOR_VERSION", "generate_synthetic", "synthetic_exists", "render_image"]
