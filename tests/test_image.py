"""Large images: read exactly up to the reduction threshold, reduced (and close to the exact
transform) above it, in every colour mode, at a bounded memory cost. The media corpus and the
transform's numerics at ordinary sizes are in test_media.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from epalm import image as image_module
from epalm.image import (
    CLIP_MEAN,
    CLIP_STD,
    MIN_REDUCED_SIDE,
    REDUCE_ABOVE_PIXELS,
    ImageTransform,
    load_image,
    prepare_image,
    source_size,
)
from epalm.media import MediaLimits

from conftest import ROOT

LEVEL = 1 / 255 / min(CLIP_STD)  # one level of 255, in the normalised tensor's units (the largest)
ORIGINAL = transforms.Compose(
    [
        transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ]
)


def exact(path) -> torch.Tensor:
    """The original's transform of the whole decoded image (upright, RGB): no reduction anywhere."""
    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        rgb = image_module._to_rgb(upright)
    return ORIGINAL(rgb)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour areas with fine grain on top, quick to make and to encode at tens of megapixels."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 256), max(2, width // 256), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC))
    grain = rng.integers(0, 24, (height, 1, 1), dtype=np.uint8)  # row stripes: detail at the finest scale
    return Image.fromarray(smooth // 2 + grain + 40)


def test_an_image_at_the_threshold_is_read_exactly(tmp_path):
    """A 6000×4000 photo (24 MP, the threshold) decodes at full size and gives the original's tensor."""
    assert REDUCE_ABOVE_PIXELS == 6000 * 4000
    path = tmp_path / "camera.jpg"
    photo(6000, 4000).save(path, quality=90)
    loaded = load_image(path)
    assert loaded.size == (6000, 4000) and source_size(loaded) == (6000, 4000)
    assert torch.equal(prepare_image(path), exact(path))


def test_a_large_jpeg_is_read_reduced_upright_and_close_to_the_exact_transform(tmp_path):
    """8192×4096 (33.5 MP), shown turned a quarter (EXIF 6): libjpeg reads it at half scale, the width
    is halved again, and the square result is turned; the file's upright size is still known."""
    pixels = np.asarray(photo(8192, 4096)).copy()
    pixels[:512, :512] = (0, 255, 0)  # a marker top-left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "pano.jpg"
    Image.fromarray(pixels).save(path, quality=90, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (MIN_REDUCED_SIDE, MIN_REDUCED_SIDE)
    assert source_size(loaded) == (4096, 8192)
    green = np.asarray(loaded)[:, :, 1] > 200
    assert green[:120, -250:].mean() > 0.9 and not green[:120, :250].any()  # the stored top-left is now top-right
    difference = (prepare_image(path) - exact(path)).abs()
    assert difference.max() <= 3 * LEVEL and difference.mean() <= 0.5 * LEVEL


def _modes(width: int, height: int) -> dict[str, Image.Image]:
    rgb = np.asarray(photo(width, height, seed=1))
    alpha = np.asarray(photo(width, height, seed=2))[:, :, 1]
    grey = rgb[:, :, 0]
    palette = Image.fromarray(rgb).quantize(64)
    keyed = Image.fromarray(grey)
    keyed.info["transparency"] = int(grey[0, 0])
    images = {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, alpha])),
        "LA": Image.fromarray(np.dstack([grey, alpha])).convert("LA"),
        "P": palette,
        "L with a transparent colour": keyed,
        "1": Image.fromarray(grey > 128),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "F": Image.fromarray(grey.astype(np.float32) / 255),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    images["P with a transparent colour"] = transparent
    return images


@pytest.mark.parametrize("mode", list(_modes(4, 4)))
def test_every_colour_mode_is_reduced_as_it_is_converted(monkeypatch, tmp_path, mode):
    """The rule at a smaller scale (the threshold lowered to 100,000 pixels, sides kept ≥ 144 for a
    16×16 input: 9 times, as 2048 is for 224): for each mode the reduced image's tensor stays within
    3 levels of the exact one (4 for black and white, whose edges are the sharpest there are), from a
    file, a PIL image and, where it has one, an array."""
    image = _modes(640, 480)[mode]
    path = tmp_path / ("image.tif" if mode in ("I;16", "F", "CMYK", "1") else "image.png")
    image.save(path)
    small = ImageTransform(size=16)
    with Image.open(path) as opened:
        opened.load()
        expected = image_module.image_tensor(image_module._to_rgb(opened), small)
    monkeypatch.setattr(image_module, "REDUCE_ABOVE_PIXELS", 100_000)
    monkeypatch.setattr(image_module, "MIN_REDUCED_SIDE", 144)
    sources = {"file": path, "PIL image": Image.open(path)}
    if mode in ("RGB", "RGBA", "I;16", "F"):
        sources["array"] = np.asarray(Image.open(path))
    for kind, src in sources.items():
        loaded = load_image(src)
        assert loaded.mode == "RGB" and loaded.size == (160, 160), kind  # 640 / 4, 480 / 3
        assert source_size(loaded) == (640, 480), kind
        difference = (prepare_image(src, small) - expected).abs()
        assert difference.max() <= (4 if mode == "1" else 3) * LEVEL, (kind, difference.max() / LEVEL)
    assert sources["PIL image"].size == (640, 480)  # a caller's image is never changed


def test_decodes_share_the_memory_budget(monkeypatch, tmp_path):
    """Four threads decode images whose estimates (8 bytes a pixel) fit one at a time in a 1.5 MiB budget:
    no two decode at once; with the default 1 GiB budget they do."""
    path = tmp_path / "photo.png"
    photo(400, 300).save(path)  # 120,000 pixels: 0.96 MB estimated
    inside, most = set(), [0]  # the threads in a decode now; the most at once
    lock, overlap = threading.Lock(), threading.Event()
    load = Image.Image.load

    def counted(self):
        me = threading.get_ident()
        if me in inside:  # ImageFile.load calls Image.load
            return load(self)
        with lock:
            inside.add(me)
            most[0] = max(most[0], len(inside))
            if len(inside) > 1:
                overlap.set()
        overlap.wait(0.3)  # gives another decode the time to start, if the budget lets it
        try:
            return load(self)
        finally:
            with lock:
                inside.discard(me)

    monkeypatch.setattr(Image.Image, "load", counted)
    for limits, expected in ((MediaLimits(max_decoding_bytes=3 * 2**19), 1), (MediaLimits(), 4)):
        most[0] = 0
        overlap.clear()
        threads = [threading.Thread(target=load_image, args=(path, limits)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (most[0] == 1) if expected == 1 else most[0] > 1, (limits, most[0])


MEASURE = textwrap.dedent(
    """
    import json, sys, threading
    import numpy as np
    from PIL import Image
    from epalm.image import load_image, image_tensor

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    path, clients = sys.argv[1], int(sys.argv[2])
    image_tensor(load_image(np.zeros((8, 8, 3), np.uint8)))  # the libraries' first-use allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = status("VmRSS")
    decoded = []  # the shapes only (no pixels stay held); a thread that raised adds none
    threads = [
        threading.Thread(target=lambda: decoded.append(image_tensor(load_image(path)).shape)) for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"peak": status("VmHWM") - start, "after": status("VmRSS") - start, "decoded": len(decoded)}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory from /proc")
def test_four_near_limit_images_at_once_cost_one_and_the_memory_comes_back(tmp_path):
    """99 megapixels of 16-bit grey in an 0.9 MB PNG, sent by four clients at once: before, one
    cost 2.1 GB (the 16-bit pixels as float64, twice) and four 8 GB. Now the four decode one at a
    time (each is estimated at 0.8 GB of the 1 GiB budget), each in under 0.7 GB, and the memory is
    handed back to the system afterwards."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.zeros((9900, 10000), np.uint16)).save(path, compress_level=1)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), "4"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    used = json.loads(result.stdout)
    assert used["decoded"] == 4, result.stderr  # every client got its image: the peak below is theirs
    assert used["peak"] < 0.9 * 2**30, used
    assert used["after"] < 100 * 2**20, used
    assert time.perf_counter() - started < 120
