"""Images to ViT input, as the original evaluated them (docs/original.md, "Preprocessing").

`load_image` accepts what users have (a path, bytes, a file object, a PIL image or a numpy array in
any common layout and bit depth) and returns an upright 8-bit RGB image; `image_tensor` applies the
original test transform: PIL bicubic resize to size × size (aspect ratio not kept, no crop),
ToTensor, then CLIP normalisation (not the 0.5/0.5 the ViT was pre-trained with: the adapters
were trained on CLIP-normalised pixels).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from .errors import bounded
from .media import MediaError, MediaLimits, Source, open_binary

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as an image viewer would
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # 16/32-bit grey: Pillow's own convert clips them

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
    checked against `limits.max_pixels` from the header, before any pixel is decoded.
    """
    if isinstance(src, np.ndarray):
        return _check_pixels(_from_array(src), limits)
    if isinstance(src, Image.Image):
        return _decode(_check_pixels(src, limits))
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
        return _decode(_check_pixels(image, limits))


def _decode(image: Image.Image) -> Image.Image:
    """Decode the pixels: upright, RGB, detached from the file."""
    try:
        image.load()  # truncated or damaged data fails here, before the orientation is read
        return _to_rgb(_upright(image))
    except MediaError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for bad data
        raise MediaError(f"The image file is truncated or damaged ({exc or type(exc).__name__}).") from exc


def _check_pixels(image: Image.Image, limits: MediaLimits) -> Image.Image:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise MediaError(f"Image is {width}×{height} pixels; the limit is {limits.max_pixels / 1e6:g} megapixels.")
    if width == 0 or height == 0:
        raise MediaError(f"Image is {width}×{height} pixels: it has no pixels.")
    return image


def _upright(image: Image.Image) -> Image.Image:
    """A decoded copy turned as its EXIF orientation tag says; a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF data: Pillow raises a variety of errors
        log.warning("ignoring unreadable EXIF orientation: %s", exc)
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB (first frame of an animation; decodes the pixels)."""
    if image.mode in _WIDE_MODES:
        return _from_array(np.asarray(image))
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


def _from_array(array: np.ndarray) -> Image.Image:
    """An RGB image from H×W or H×W×C pixels; the scale is read from the dtype (see load_image)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise MediaError(f"Expected an image array of shape H×W, H×W×3 or H×W×4, not {tuple(array.shape)}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MediaError(f"Image is {array.shape[1]}×{array.shape[0]} pixels: it has no pixels.")
    image = Image.fromarray(_to_uint8(array))
    return _to_rgb(image)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise MediaError("The image array contains NaN or infinite values.")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0  # [0, 1] floats, else already 0..255
        return np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise MediaError(f"Integer image values must lie in 0..255 or 0..65535, not {low}..{high}.")
        if (array.dtype.kind == "u" and array.dtype.itemsize == 2) or high > 255:  # 16-bit: scale, do not clip
            return np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)
        return array.astype(np.uint8)
    raise MediaError(f"Unsupported image array type {array.dtype}.")


def image_tensor(image: Image.Image, transform: ImageTransform = ImageTransform()) -> torch.Tensor:
    """[3, size, size] float32: PIL bicubic resize (aspect not kept) → [0, 1] → normalise."""
    resized = TF.resize(image, [transform.size, transform.size], interpolation=InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(resized), transform.mean, transform.std)


def prepare_image(
    src: ImageSource, transform: ImageTransform = ImageTransform(), limits: MediaLimits = MediaLimits()
) -> torch.Tensor:
    """`load_image` then `image_tensor`: ViT input [3, size, size] for one image."""
    return image_tensor(load_image(src, limits), transform)
