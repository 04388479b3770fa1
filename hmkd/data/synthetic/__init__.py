"""Deterministic synthetic small-object detection data set, written as COCO (PNG images + JSON).

Layout written by :func:`generate_synthetic`::

    out_dir/train/images/000001.png ...   out_dir/val/images/000001.png ...
    out_dir/annotations/train.json        out_dir/annotations/val.json
    out_dir/meta.json                     (parameters + statistics; written last)

How an image is made (all randomness from a numpy ``Generator`` seeded by
``(seed, split, index, crc32(preset))``, so the same arguments give byte-identical JSON and
identical pixels, and image ``i`` does not depend on how many images are generated). ``size`` is an
int (a square) or ``[height, width]``; what scales with the image (the objects' size cap, the
distractors' length) takes the shorter side, so a square ``[s, s]`` gives the images of ``s``:

1. Background: a two-colour linear gradient in muted palette colours, low-frequency colour noise
   (bilinearly upsampled coarse grid) and, in some images, a stripe texture.
2. Distractors in the same palette as the objects: elongated ellipses, thin strokes, lobed blobs
   and soft (Gaussian) blobs, so colour never gives the class or the objectness away; none of them
   is one of the class shapes.
3. Objects: classes are shapes (``disc, square, triangle, ring, cross, diamond`` by default;
   ``hexagon`` and ``star`` join in the hard preset), colour drawn independently of the class
   (redrawn, up to 4 times, while within ``min_colour_distance`` of the local background, then
   blended toward the background by the ``contrast`` factor). Sizes (side of the shape's box)
   follow a mixture: mostly small (< 32 px), some medium, a few large. Shapes are rasterised with
   supersampled coverage (anti-aliased edges); the object's mask is coverage >= 0.5. Objects are
   painted largest first, later ones on top, optionally clustered next to earlier ones. An object
   is only placed if every object (itself included, also against the image border) keeps at least
   ``min_visible`` of its pixels and ``min_pixels`` pixels; otherwise it is re-placed
   (``place_tries`` times) or skipped. So every painted object is labelled, and no labelled object
   is mostly hidden.
4. Sensor noise over everything, then rounding to uint8.

Annotations are of what is *visible*: ``segmentation`` is the compressed RLE of the visible mask
(exact for tiny objects, unlike polygons), ``area`` its pixel count, ``bbox`` its tight box
``[x, y, w, h]`` in pixels, ``iscrowd`` 0.

Presets: ``"default"`` (the set of docs/CALIBRATION.md: 6-32 objects of 6-160 px, about 80% small, high contrast),
``"aitod"`` (the paper-regime benchmark's set: 10-40 objects whose sizes span AI-TOD's buckets, very
tiny to medium), ``"pretrain"`` (the ImageNet stand-in's set: the same kind of images with six other
classes, see :mod:`hmkd.training.pretrain`), ``"hard"`` (30-60 objects, mostly 4-16 px, clustered and
overlapping, 8 classes with confusable pairs disc/hexagon, square/diamond, cross/star, lower contrast
and more noise) and ``"paper_size"`` (for the paper's 800 x 1333 images, configs/coco/cost_800x1333.yaml:
45 objects, ~36 of them small, 6-31 px, and ~9 of 32-160 px, VisDrone-like), any of whose keys can be
overridden (see ``PRESETS``). A folder already holding a set made with the same
parameters (recorded in ``meta.json``) is not regenerated.

Modules: :mod:`~hmkd.data.synthetic.presets` (``PRESETS``, a preset with overrides resolved and
checked), :mod:`~hmkd.data.synthetic.shapes` (the class shapes ``SHAPES`` and their rasterisation),
:mod:`~hmkd.data.synthetic.render` (one image: steps 1-4 above, :func:`render_image`) and
:mod:`~hmkd.data.synthetic.write` (the COCO files and ``meta.json``: :func:`generate_synthetic`,
:func:`synthetic_exists`). Import from ``hmkd.data.synthetic``; the names above are re-exported here.
"""

from __future__ import annotations

from .presets import PRESETS
from .render import render_image
from .shapes import SHAPES
from .write import GENERATOR_VERSION, generate_synthetic, synthetic_exists

__all__ = ["PRESETS", "SHAPES", "GENERATOR_VERSION", "generate_synthetic", "synthetic_exists", "render_image"]
