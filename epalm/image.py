"""Images to ViT input, as the original evaluated them (docs/original.md, "Preprocessing").

`load_image` accepts what users have (a path, bytes, a file object, a PIL image or a numpy array in
any common layout and bit depth) and returns an upright 8-bit RGB image; `image_tensor` applies the
original test transform: PIL bicubic resize to size × size (aspect ratio not kept, no crop),
ToTensor, then CLIP normalisation (not the 0.5/0.5 the ViT was pre-trained with: the adapters
were trained on CLIP-normalised pixels).

Memory: a decoded image costs 3-4 bytes a pixel, 300-400 MB at the 100-megapixel limit, and its
conversions as much again. So that a few large uploads cannot take a server:
- An image of more than `REDUCE_ABOVE_PIXELS` is decoded reduced, each side by the largest factor that
  divides it and keeps it at least `MIN_REDUCED_SIDE` pixels (a JPEG by libjpeg's DCT scaling while
  it is read, so that only the reduced pixels are ever held; other formats by `Image.reduce` right
  after decoding). A side with no such factor (a prime number of pixels) is not reduced.
  The bicubic resize to 224 then starts from at least 9× its size; `bench/decode_memory.py` measures
  what that changes: at most 2 levels of 255 for photos, noise and text (means ≤ 0.33 of a level), 4 on
  a zone plate's finest rings. Smaller images are read exactly as the original read them.
- Decodes share a memory budget (`MediaLimits.max_decoding_bytes`, see `media.DecodingBudget`), an
  image being counted at `BYTES_PER_PIXEL` for each pixel it is decoded at.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from .errors import bounded
from .media import MediaError, MediaLimits, Source, decoding_budget, open_binary

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as an image viewer would
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # 16/32-bit grey: Pillow's own convert clips them
REDUCE_ABOVE_PIXELS = 24_000_000  # larger images are decoded reduced; a 6000×4000 photo and smaller ones exactly
MIN_REDUCED_SIDE = 2048  # a reduced image's sides: ≥ 2 × MAX_INPUT_SIZE, ≥ 9 × the released encoders' 224
SOURCE_SIZE = "epalm.source_size"  # info key of a reduced image: its upright size in the file
BYTES_PER_PIXEL = 8  # a decoding image's memory: Pillow keeps RGB in 4 bytes a pixel, and a copy or conversion
_CHUNK = 2**20  # values of a wide-mode image converted to 8 bits at a time (float64 work space: 8 MB)

ImageSource = Source | Image.Image | np.ndarray


@dataclass(frozen=True)
class ImageTransform:
    """The original test transform for images."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        check_pixel_transform(self.size, self.mean, self.std)


MAX_INPUT_SIZE = 1024  # an encoder input's side in pixels (the released encoders take 224)


def check_pixel_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """The bounds of a picture transform's settings (images and video frames), before anything is allocated."""
    bounded("size", size, 16, MAX_INPUT_SIZE)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise ValueError(f"{name} must hold 3 numbers (red, green, blue), not {len(values)}")
        for value in values:
            bounded(name, value, 1e-6 if name == "std" else -10, 10, whole=False)


def load_image(src: ImageSource, limits: MediaLimits = MediaLimits()) -> Image.Image:
    """An upright 8-bit RGB image from a path, bytes, a binary file object, a PIL image or a numpy
    array (H×W, H×W×1/3/4; uint8, uint16, bool or float in [0, 1]).

    EXIF orientation is applied; transparency is composited on white; 16-bit images are scaled
    (not clipped) to 8 bits; an animated GIF/WebP/PNG gives its first frame. The pixel count is
    checked against `limits.max_pixels` from the header, before any pixel is decoded. An image of
    more than `REDUCE_ABOVE_PIXELS` comes back reduced (see the module's docstring); `source_size`
    gives its size in the file.
    """
    if isinstance(src, np.ndarray):
        return _decode_array(src, limits)
    if isinstance(src, Image.Image):
        return _decode(_check_pixels(src, limits), limits, opened=False)
    fp = open_binary(src, limits)
    try:
        image = Image.open(fp)  # reads the header only; refuses over 2 × Image.MAX_IMAGE_PIXELS itself
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)) / 1e6:,.0f} megapixels" if pixels else "too many pixels"
        raise MediaError(f"Image is {size}; the limit is {limits.max_pixels / 1e6:g} megapixels.") from exc
    except UnidentifiedImageError as exc:
        raise MediaError(
            "Could not read this file as an image: it is not a format Pillow knows "
            "(JPEG, PNG, WebP, GIF, BMP, TIFF...) or it is damaged."
        ) from exc
    except Exception as exc:  # a header Pillow recognised but could not parse
        raise MediaError(f"The image file is damaged ({exc or type(exc).__name__}).") from exc
    with image:
        return _decode(_check_pixels(image, limits), limits, opened=True)


def source_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of a `load_image` result as its file has it, upright: its own size unless it
    was decoded reduced."""
    return image.info.get(SOURCE_SIZE, image.size)


def _decode(image: Image.Image, limits: MediaLimits, opened: bool) -> Image.Image:
    """Decode the pixels (reduced above `REDUCE_ABOVE_PIXELS`): upright, RGB, detached from the file.
    `opened`: the image is a file this module opened (not a caller's, which is never changed), closed
    here so that its memory is handed back to the system before the budget is."""
    width, height = image.size
    if opened and _reduction(width, height) != (1, 1):
        scale = _draft_scale(width, height)
        image.draft(image.mode, (width // scale, height // scale))  # JPEG: read at 1/2, 1/4 or 1/8 scale
    with decoding_budget(limits).hold(image.width * image.height * BYTES_PER_PIXEL):
        try:
            image.load()  # truncated or damaged data fails here, before the orientation is read
            reduced = _reduce(image, _reduction(*image.size) if image.size == (width, height) else _gap(*image.size))
            rgb = _to_rgb(_upright(reduced, copy=reduced is image))
            if reduced.size != (width, height):  # a quarter turn swaps the sides
                turned = _orientation(image) in (5, 6, 7, 8)
                rgb.info[SOURCE_SIZE] = (height, width) if turned else (width, height)
        except MediaError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for bad data
            raise MediaError(f"The image file is truncated or damaged ({exc or type(exc).__name__}).") from exc
        finally:
            if opened:
                image.close()  # its pixels are freed while the budget is still held
    return rgb


def _reduction(width: int, height: int) -> tuple[int, int]:
    """The factors an image of this size is reduced by while it is read: none up to `REDUCE_ABOVE_PIXELS`."""
    return (1, 1) if width * height <= REDUCE_ABOVE_PIXELS else _gap(width, height)


def _gap(width: int, height: int) -> tuple[int, int]:
    """Per side, the largest factor that divides it and keeps it at least `MIN_REDUCED_SIDE` (1 if
    none does). Whole blocks only: a partial block at the edge would be a whole pixel of the reduced
    image and stretch it by a fraction of a pixel, which sharp detail turns into several levels."""
    return _divisor(width, width // MIN_REDUCED_SIDE), _divisor(height, height // MIN_REDUCED_SIDE)


def _divisor(side: int, most: int) -> int:
    return next(factor for factor in range(max(most, 1), 0, -1) if side % factor == 0)


def _draft_scale(width: int, height: int) -> int:
    """libjpeg's scale (8, 4, 2 or 1) for a JPEG: the largest that divides both sides (whole blocks,
    as in `_gap`) and keeps them at least `MIN_REDUCED_SIDE`."""
    most = min(width, height) // MIN_REDUCED_SIDE
    return next(s for s in (8, 4, 2, 1) if s <= max(most, 1) and width % s == 0 and height % s == 0)


def _reduce(image: Image.Image, factors: tuple[int, int]) -> Image.Image:
    """`image` box-averaged by `factors` (itself when there is nothing to reduce), its EXIF kept for
    the orientation."""
    if factors == (1, 1):
        return image
    exif = _exif(image)
    reduced = _reducible(image).reduce(factors)
    if exif:
        reduced.info["exif"] = exif
    return reduced


def _reducible(image: Image.Image) -> Image.Image:
    """`image` in a mode whose pixels can be averaged: what `_to_rgb` would first turn it into where
    it is not (16-bit grey scaled to 8 bits on all of its pixels, as before; colour-key transparency
    and palettes applied)."""
    if image.mode in _WIDE_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode == "PA" or "transparency" in image.info:
        return image.convert("RGBA")
    if image.mode in ("1", "P"):
        return image.convert("L" if image.mode == "1" else "RGB")
    return image


def _exif(image: Image.Image) -> bytes | None:
    try:
        exif = image.getexif()
        return exif.tobytes() if exif else None
    except Exception as exc:  # malformed EXIF data: Pillow raises a variety of errors
        log.warning("ignoring unreadable EXIF data: %s", exc)
        return None


def _check_pixels(image: Image.Image, limits: MediaLimits) -> Image.Image:
    _check_size(*image.size, limits)
    return image


def _check_size(width: int, height: int, limits: MediaLimits) -> None:
    if width * height > limits.max_pixels:
        raise MediaError(f"Image is {width}×{height} pixels; the limit is {limits.max_pixels / 1e6:g} megapixels.")
    if width == 0 or height == 0:
        raise MediaError(f"Image is {width}×{height} pixels: it has no pixels.")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag that `ImageOps.exif_transpose` follows (1: as stored)."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF data: ignored by _upright too
        return 1


def _upright(image: Image.Image, copy: bool) -> Image.Image:
    """Turned as its EXIF orientation tag says: a decoded copy, or `image` itself turned in place
    (`copy=False`: an image of this module's own); a broken EXIF block is ignored."""
    try:
        if copy:
            return ImageOps.exif_transpose(image)
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except Exception as exc:  # malformed EXIF data: Pillow raises a variety of errors
        log.warning("ignoring unreadable EXIF orientation: %s", exc)
        return image.copy() if copy else image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB (first frame of an animation; decodes the pixels)."""
    if image.mode in _WIDE_MODES:
        return _to_rgb(Image.fromarray(_to_uint8(np.asarray(image))))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:  # modes Pillow cannot convert (LAB, HSV...)
        raise MediaError(f"Images in colour mode {image.mode} are not supported; please save it as RGB.") from exc


def _decode_array(array: np.ndarray, limits: MediaLimits) -> Image.Image:
    """An RGB image from H×W or H×W×C pixels; the scale is read from the dtype (see load_image)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise MediaError(f"Expected an image array of shape H×W, H×W×3 or H×W×4, not {tuple(array.shape)}.")
    height, width = array.shape[:2]
    _check_size(width, height, limits)
    with decoding_budget(limits).hold(width * height * BYTES_PER_PIXEL):
        image = Image.fromarray(_to_uint8(array))
        reduced = _reduce(image, _reduction(width, height))
        rgb = _to_rgb(reduced)
    if reduced is not image:
        rgb.info[SOURCE_SIZE] = (width, height)
    return rgb


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise MediaError("The image array contains NaN or infinite values.")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0  # [0, 1] floats, else already 0..255
        return _rescaled(array, lambda part: np.clip(np.rint(part * scale), 0, 255))
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise MediaError(f"Integer image values must lie in 0..255 or 0..65535, not {low}..{high}.")
        if (array.dtype.kind == "u" and array.dtype.itemsize == 2) or high > 255:  # 16-bit: scale, do not clip
            return _rescaled(array, lambda part: np.rint(part / 257.0))
        return array.astype(np.uint8)
    raise MediaError(f"Unsupported image array type {array.dtype}.")


def _rescaled(array: np.ndarray, scale: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """uint8 `scale(rows as float64)`, a few rows at a time: the float64 work space stays a few MB
    instead of 8 bytes for each of up to 100 million pixels (the result is the same)."""
    out = np.empty(array.shape, np.uint8)
    rows = max(1, _CHUNK // max(1, array[0].size))
    for start in range(0, len(array), rows):
        out[start : start + rows] = scale(array[start : start + rows].astype(np.float64))
    return out


def image_tensor(image: Image.Image, transform: ImageTransform = ImageTransform()) -> torch.Tensor:
    """[3, size, size] float32: PIL bicubic resize (aspect not kept) → [0, 1] → normalise."""
    resized = TF.resize(image, [transform.size, transform.size], interpolation=InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(resized), transform.mean, transform.std)


def prepare_image(
    src: ImageSource, transform: ImageTransform = ImageTransform(), limits: MediaLimits = MediaLimits()
) -> torch.Tensor:
    """`load_image` then `image_tensor`: ViT input [3, size, size] for one image."""
    return image_tensor(load_image(src, limits), transform)
