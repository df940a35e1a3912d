"""The image processor, with pillow and numpy only, under either member's resize rules.

    image (path | pathlib.Path | PIL.Image | bytes)
      -> RGB (PIL convert: alpha dropped, not composited, as the reference's chat() does)
      -> smart_resize to multiples of 28 within [min_pixels, max_pixels], bicubic on uint8
      -> x / 255 (float64, then float32) -> (x - CLIP mean) / CLIP std (float32), channels first
      -> two identical frames (temporal patch 2) -> rows of 2x2 merge windows
      -> pixel_values [gh * gw, 1176] float32, grid (1, gh, gw)

Two sets of rules, which differ only in smart_resize's edge cases (the pixels are otherwise identical):
    "points"   POINTS-1.5's `Qwen2ImageProcessorForPOINTSV15` (wepoints/utils/images.py)
    "qwen2vl"  transformers' stock `Qwen2VLImageProcessor` (5.x: qwen2_vl/image_processing_pil_qwen2_vl.py),
               which POINTS-Reader and POINTS-GUI-G call
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import repeat
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56  # Qwen2VLImageProcessor class defaults, used where preprocessor_config.json is absent
MAX_PIXELS = 28 * 28 * 1280
RELEASE_MAX_PIXELS = 12_845_056  # what Qwen2-VL releases ship in preprocessor_config.json (POINTS most likely too)
MAX_IMAGE_PIXELS = 89_478_485  # pillow's default decompression-bomb threshold (about 9459 x 9459)


RULES = ("points", "qwen2vl")
ITEM_MAX_PIXELS = ("bounds", "prefit")  # what an image item's own max_pixels means (ImageProcessor.__call__)


def check_rules(rules: str) -> str:
    """`rules` itself when it names a set of rules, else one line naming it."""
    if rules not in RULES:
        raise ValueError(f"rules = {rules!r}: expected one of {', '.join(map(repr, RULES))}")
    return rules


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, rules: str = "points") -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Python's round (banker's rounding), floor when shrinking to max_pixels, ceil when growing to min_pixels,
    as both references. Where they differ:
      aspect ratio over 200   "points" refuses it only when both sides are at least `factor` (a thinner image
                              goes through the min_pixels branch); "qwen2vl" refuses it at any size.
      shrinking to max_pixels "points" may floor a side to 0 (refused below); "qwen2vl" keeps it at `factor`,
                              even when that leaves the area over max_pixels."""
    check_rules(rules)
    if min(height, width) < 1:
        raise ValueError(f"image size {width}x{height}: both sides must be at least 1 pixel")
    ratio = max(height, width) / min(height, width)
    if ratio > 200 and (rules == "qwen2vl" or min(height, width) >= factor):
        shown = f"{ratio:.1f}" if round(ratio, 1) > 200 else f"{ratio:.4f}"  # never "200.0 is over 200"
        raise ValueError(f"image size {width}x{height}: aspect ratio {shown} is over 200, which the model "
                         "cannot take")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        least = factor if rules == "qwen2vl" else 0
        h = max(least, math.floor(height / beta / factor) * factor)
        w = max(least, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h < factor or w < factor:
        raise ValueError(f"image size {width}x{height}: resizes to {w}x{h}, which holds no whole "
                         f"{factor}x{factor} window (aspect ratio too extreme)")
    return h, w


def is_url(text: str) -> bool:
    """`http://...`, `https://...`, `file://...` or any other `scheme://` (never read as a path)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def open_image(image) -> Image.Image:
    """A path, pathlib.Path, bytes or PIL image -> PIL image (first frame of an animation), RGB.

    Files are refused before decoding when their header declares more than MAX_IMAGE_PIXELS pixels
    (decompression bombs). EXIF orientation is ignored, as the reference ignores it. 16-bit grayscale is
    scaled to 8 bits (the reference's convert("RGB") clips it to white); alpha is dropped, not composited
    (premultiplied "La" and "RGBa" are un-premultiplied first, as pillow converts them)."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, str) and is_url(image):
        raise ValueError(f"{image}: URLs are not fetched; download the file first and give its path")
    elif isinstance(image, (str, Path, bytes, bytearray)):
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        name = "image bytes" if isinstance(image, (bytes, bytearray)) else str(image)
        img = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
                img = Image.open(source)  # reads the header only
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{img.width}x{img.height}")
                img.load()
        except FileNotFoundError:
            raise ValueError(f"{name}: file not found") from None
        except Image.DecompressionBombError as e:
            if img is not None:
                size = f"{img.width}x{img.height} = {img.width * img.height:,} pixels"
            else:  # over twice the limit pillow raises in open(), with its own limit in the text: keep the size only
                found = re.search(r"\((\d+) pixels\)", str(e))
                size = f"{int(found[1]):,} pixels" if found else "too many pixels"
            raise ValueError(f"{name}: declares {size}, over the limit of {MAX_IMAGE_PIXELS:,} pixels "
                             "(a decompression bomb?); refused before decoding") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{name}: not a readable image ({e})") from None
    else:
        raise ValueError(f"image: expected a path, pathlib.Path, bytes or PIL.Image.Image, got {type(image).__name__}")
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the same colours as P -> RGB, without pillow's palette warning
    elif img.mode == "La":  # premultiplied grey + alpha: pillow converts it to RGB only through LA
        img = img.convert("LA")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageProcessor:
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rules: str = "points"  # "points" or "qwen2vl": whose smart_resize (see the module docstring)
    item_max_pixels: str = "bounds"  # what an image's own max_pixels means: "bounds" or "prefit" (see __call__)

    def __post_init__(self):
        check_rules(self.rules)
        if self.item_max_pixels not in ITEM_MAX_PIXELS:
            raise ValueError(f"item_max_pixels = {self.item_max_pixels!r}: expected one of {ITEM_MAX_PIXELS}")

    @classmethod
    def from_dir(cls, directory: str | Path, rules: str = "points", item_max_pixels: str = "bounds") -> "ImageProcessor":
        """From `preprocessor_config.json` when present (min/max pixels, mean, std), else the defaults.

        `rules` is the member's (points.model.family), not the file's: both kinds of file name the same class."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            return cls(rules=rules, item_max_pixels=item_max_pixels)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        size = d.get("size") or {}
        return cls(min_pixels=int(d.get("min_pixels", size.get("shortest_edge", MIN_PIXELS))),
                   max_pixels=int(d.get("max_pixels", size.get("longest_edge", MAX_PIXELS))),
                   patch_size=int(d.get("patch_size", 14)), temporal_patch_size=int(d.get("temporal_patch_size", 2)),
                   merge_size=int(d.get("merge_size", 2)), mean=tuple(d.get("image_mean", CLIP_MEAN)),
                   std=tuple(d.get("image_std", CLIP_STD)), rules=rules, item_max_pixels=item_max_pixels)

    def to_json(self) -> dict:
        """The preprocessor_config.json that `from_dir` reads back into this processor (given the same rules)."""
        return {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
                "image_mean": list(self.mean), "image_std": list(self.std)}

    def __call__(self, image, max_pixels: int | None = None,
                 min_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image -> pixel_values [gh * gw, 3 * 2 * 14 * 14] float32 and its grid (1, gh, gw).

        An image's own bounds (an image item's `min_pixels` / `max_pixels`): `min_pixels` replaces the
        processor's for this image; `max_pixels` too under item_max_pixels="bounds" (Qwen-VL's convention: the
        result is this processor's with those bounds), while under "prefit" (POINTS-Reader's chat) an image of
        more pixels is first shrunk to (floor(w / b), floor(h / b)), b = sqrt(w * h / max_pixels), bicubic, then
        processed within the processor's own max_pixels."""
        img = open_image(image)
        prefit = self.item_max_pixels == "prefit"
        if prefit and max_pixels is not None and img.width * img.height > max_pixels:
            b = math.sqrt(img.width * img.height / max_pixels)
            img = img.resize((max(1, math.floor(img.width / b)), max(1, math.floor(img.height / b))),
                             resample=Image.Resampling.BICUBIC)
        own = self
        if min_pixels is not None or (max_pixels is not None and not prefit):
            own = dataclasses.replace(self, min_pixels=self.min_pixels if min_pixels is None else min_pixels,
                                      max_pixels=self.max_pixels if max_pixels is None or prefit else max_pixels)
        h, w = own.target_size(img.height, img.width)
        if (img.height, img.width) != (h, w):
            img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
        x = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        p, m = self.patch_size, self.merge_size
        # one row per p x p patch: m x m merge windows in raster order, patches in raster order inside each
        # window; a row holds (channel, frame, y, x), the one image repeated as `temporal_patch_size` frames
        rows = repeat(x, "(wh mh y) (ww mw x) c -> (wh ww mh mw) (c t y x)", mh=m, mw=m, y=p, x=p,
                      t=self.temporal_patch_size)
        return torch.from_numpy(np.ascontiguousarray(rows)), (1, h // p, w // p)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to, under this processor's rules."""
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels,
                            self.rules)

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """LLM tokens for one image: one per merge window."""
        return grid[1] * grid[2] // self.merge_size ** 2
