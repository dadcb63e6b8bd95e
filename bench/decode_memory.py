"""What decoding large uploads costs in memory, and what the bounded decode changes in the model's input.

    python bench/decode_memory.py                          # this checkout (~10 min on 2 cores)
    python bench/decode_memory.py --baseline /path/to/old  # and another checkout, interleaved, in the same run
    python bench/decode_memory.py --quick                  # small inputs (what the test runs)

Memory. Each (checkout, input, clients) runs in a fresh process that imports that checkout's `epalm`,
decodes a tiny input once (the libraries' first-use allocations), then starts N threads that decode
the same file at once, as N clients of a server do, the way the app decodes it (`load_image` then
`image_tensor`; a video both ways: `prepare_video`, and `sample_frames` then `video_tensor`, the
`inspect=True` path until the inspector takes `sample_video`). peak: the process's high-water mark
(VmHWM, reset before the threads start) above its resident size before; after: the resident size
once the threads are done, above it too. Checkouts alternate for each input and client count.
Inputs, written once into a temporary folder: 99-megapixel images (a photo-like JPEG, a smooth PNG
(with grain it passes the 200 MB upload limit), and two hostile small files: a 16-bit grey PNG and a
half-transparent RGBA PNG) and a 4K (3840×2160) clip, 16 frames sampled.

Fidelity. `image_tensor(load_image(file))` against the original's transform of the whole decoded
image (PIL bicubic to 224×224), for images of 24 MP (the threshold: read exactly), 48, 90 (9999×9001:
one side prime, so not reduced, the other by 3) and 99 MP with four contents (photo-like, noise, a
zone plate, black-and-white text-like blocks) as JPEG and PNG: the largest and the mean difference
in levels of 255.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # `python bench/decode_memory.py` puts bench/ first, not the repository

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

from bench import report  # noqa: E402
from epalm import image as image_module  # noqa: E402
from epalm.image import CLIP_MEAN, CLIP_STD, image_tensor, load_image  # noqa: E402
from epalm.media import MediaLimits  # noqa: E402

LEVEL = 1 / 255 / min(CLIP_STD)  # one level of 255 in the normalised tensor's units (the largest of the channels)
ORIGINAL = transforms.Compose(
    [
        transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ]
)
WORKER = textwrap.dedent(
    """
    import json, sys, threading
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from PIL import Image
    from epalm.image import image_tensor, load_image
    from epalm import video

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    how, path, clients = sys.argv[2], sys.argv[3], int(sys.argv[4])
    Image.MAX_IMAGE_PIXELS = None  # Pillow's own warning at 89 MP: the library's limit is checked instead
    if how == "image":
        run = lambda: image_tensor(load_image(path))
    elif how == "video":
        run = lambda: video.prepare_video(path, video.VideoTransform(num_frames=16))
    else:
        run = lambda: video.video_tensor(video.sample_frames(path, 16).frames)
    image_tensor(load_image(np.zeros((8, 8, 3), np.uint8)))
    video.video_tensor(np.zeros((1, 8, 8, 3), np.uint8))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status("VmRSS")
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"start": start, "peak": status("VmHWM") - start, "after": status("VmRSS") - start}))
    """
)


def photo(width: int, height: int, seed: int = 0, grain: bool = True) -> np.ndarray:
    """Smooth colour areas, with camera-like grain: what a large photo looks like to the resize."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 100), max(2, width // 100), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    if not grain:
        return pixels
    pixels = pixels.astype(np.int16)
    for start in range(0, height, 1024):  # in bands: the grain as int16 at 99 MP would take 0.6 GB
        band = pixels[start : start + 1024]
        band += rng.integers(-12, 13, band.shape[:2] + (1,), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def content(kind: str, width: int, height: int) -> np.ndarray:
    if kind == "photo":
        return photo(width, height)
    if kind == "noise":
        return np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "zone plate":  # rings ever finer towards the edges: every frequency up to the pixel pitch
        y = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
        x = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
        rings = 127.5 + 127.5 * np.cos(np.pi / 4 * min(width, height) * (x * x + y * y))
        return np.repeat(rings.astype(np.uint8)[:, :, None], 3, axis=2)
    # text-like: black-and-white blocks of random sizes, the sharpest edges a scan has
    rng = np.random.default_rng(2)
    marks = rng.random((-(-height // 8), -(-width // 8))) > 0.7
    blocks = np.repeat(np.repeat(np.where(marks, 0, 255).astype(np.uint8), 8, 0), 8, 1)[:height, :width]
    return np.repeat(blocks[:, :, None], 3, axis=2)


def exact_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        image.load()
        return ORIGINAL(image_module._to_rgb(ImageOps.exif_transpose(image)))


def fidelity(sizes: list[tuple[int, int]], kinds: list[str], formats: list[str], folder: Path) -> list[dict]:
    rows = []
    options = {"JPEG": {"quality": 90}, "PNG": {"compress_level": 1}}
    for width, height in sizes:
        for kind in kinds:
            pixels = content(kind, width, height)
            for fmt in formats:
                path = folder / f"fidelity.{fmt.lower()}"
                Image.fromarray(pixels).save(path, fmt, **options[fmt])
                loaded = load_image(path, MediaLimits(max_file_bytes=2**31))  # noise PNGs pass the 200 MB limit
                difference = ((image_tensor(loaded) - exact_tensor(path)).abs() / LEVEL).flatten()
                row = {
                    "size": f"{width}×{height}",
                    "megapixels": round(width * height / 1e6, 1),
                    "content": kind,
                    "format": fmt,
                    "decoded": "×".join(map(str, loaded.size)),
                    "max_levels": round(float(difference.max()), 2),
                    "mean_levels": round(float(difference.mean()), 3),
                    "over_1_level": round(float((difference > 1.01).float().mean()), 4),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            del pixels
    return rows


def write_inputs(folder: Path, quick: bool) -> dict[str, tuple[str, Path]]:
    """The memory run's inputs: name -> (how the worker decodes it, path)."""
    width, height = (2400, 1600) if quick else (11000, 9000)
    megapixels = f"{width * height / 1e6:.0f} MP"
    Image.fromarray(photo(width, height)).save(folder / "photo.jpg", quality=90)
    inputs = {f"{megapixels} JPEG photo": ("image", folder / "photo.jpg")}
    if not quick:
        Image.fromarray(photo(width, height, grain=False)).save(folder / "smooth.png")  # with grain: over 200 MB
        inputs[f"{megapixels} PNG (smooth)"] = ("image", folder / "smooth.png")
        Image.fromarray(np.zeros((height, width), np.uint16)).save(folder / "grey16.png", compress_level=1)
        inputs[f"{megapixels} 16-bit grey PNG"] = ("image", folder / "grey16.png")
        rgba = np.zeros((height, width, 4), np.uint8)
        rgba[:, :, 3] = 128
        Image.fromarray(rgba).save(folder / "rgba.png", compress_level=1)
        inputs[f"{megapixels} RGBA PNG"] = ("image", folder / "rgba.png")
        del rgba
    clip = write_clip(folder / "clip.mp4", (320, 176) if quick else (3840, 2160), 24 if quick else 48)
    label = "320×176" if quick else "4K"
    inputs[f"{label} clip, prepare_video"] = ("video", clip)
    if not quick:
        inputs[f"{label} clip, sample_frames + video_tensor"] = ("frames", clip)
    return inputs


def write_clip(path: Path, size: tuple[int, int], frames: int) -> Path:
    width, height = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"preset": "ultrafast", "g": "12"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 16 * i, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def measure(root: Path, how: str, path: Path, clients: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(root), how, str(path), str(clients)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the worker failed on {path} ({root}):\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.splitlines()[-1]), "seconds": round(time.perf_counter() - started, 1)}


def memory(roots: dict[str, Path], inputs: dict[str, tuple[str, Path]], clients: list[int]) -> list[dict]:
    rows = []
    for name, (how, path) in inputs.items():
        for count in clients:
            for label, root in roots.items():  # interleaved: each checkout in turn, for each input and count
                row = {"input": name, "clients": count, "checkout": label, **measure(root, how, path, count)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def section(results: dict) -> str:
    gb = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = [
        "## Decoding large media: memory (bench/decode_memory.py)",
        "",
        f"Generated by `python bench/decode_memory.py{results['argv']}` on {results['date']} "
        f"({results['minutes']:.0f} min); {results['machine']}. Each row: a fresh process, N threads decoding the same "
        "file at once as N clients would; peak = high-water mark above the resident size before the threads started, "
        "after = resident size once they finished, above it too (GB). Checkouts: "
        + ", ".join(f"{k} = {v}" for k, v in results["checkouts"].items())
        + ".",
        "",
        "| input | clients | " + " | ".join(f"{k} peak | {k} after" for k in results["checkouts"]) + " |",
        "|---|---|" + "---|---|" * len(results["checkouts"]),
    ]
    keyed = {(r["input"], r["clients"], r["checkout"]): r for r in results["memory"]}
    for name in dict.fromkeys(r["input"] for r in results["memory"]):
        for count in dict.fromkeys(r["clients"] for r in results["memory"]):
            cells = []
            for label in results["checkouts"]:
                row = keyed.get((name, count, label))
                cells += [gb(row["peak"]), gb(row["after"])] if row else ["-", "-"]
            lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fidelity: the bounded decode's 224×224 input against the original's transform of the whole image, in levels "
        "of 255 (normalised units / (1/255/std)); `decoded` is the size the image was read at.",
        "",
        "| size | content | format | decoded | max | mean | share > 1 level |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["fidelity"]:
        lines.append(
            f"| {r['size']} ({r['megapixels']} MP) | {r['content']} | {r['format']} | {r['decoded']} | "
            f"{r['max_levels']:g} | {r['mean_levels']:.3f} | {100 * r['over_1_level']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another checkout (a folder holding epalm/) measured beside this one")
    p.add_argument("--baseline-name", help="what the report calls it (default: its path), e.g. a commit")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="threads decoding at once (default: 1 8)")
    p.add_argument(
        "--quick", action="store_true", help="a 4 MP JPEG, a small clip; fidelity of a 25 MP JPEG (what the test runs)"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "decode_memory.json"))
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="'' to leave RESULTS.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench/decode_memory.py reads the process's memory from /proc: run it on Linux.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    roots = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    with tempfile.TemporaryDirectory(prefix="epalm-decode-") as tmp:
        folder = Path(tmp)
        sizes = [(5000, 5000)] if args.quick else [(6000, 4000), (8000, 6000), (9999, 9001), (11000, 9000)]
        kinds = ["photo"] if args.quick else ["photo", "noise", "zone plate", "text"]
        results = {
            "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, Pillow {Image.__version__}",
            "checkouts": {k: args.baseline_name or str(v) if k == "baseline" else str(v) for k, v in roots.items()},
            "fidelity": fidelity(sizes, kinds, ["JPEG"] if args.quick else ["JPEG", "PNG"], folder),
            "memory": memory(roots, write_inputs(folder, args.quick), args.clients),
        }
    results["minutes"] = (time.perf_counter() - started) / 60
    Path(args.out).write_text(json.dumps(results, indent=1))
    text = section(results)
    if args.results:
        report.write_section(Path(args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
