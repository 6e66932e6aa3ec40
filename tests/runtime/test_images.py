"""Tests for runtime/images.py: open_clip eval-transform parity, input modes, errors.

The parity reference below is written independently of runtime/images.py, with torch, from
torchvision's documented steps (PIL ``img.resize`` to the size computed by
``_compute_resized_output_size``, ``center_crop`` arithmetic and zero padding, ``to_tensor``,
``normalize``) in open_clip's order (resize, crop, ``convert("RGB")``, to tensor, normalize).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from runtime.images import (
    EXACT_RESIZE_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageError,
    PreprocessConfig,
    image_list,
    load_image,
    preprocess,
)

REPO = Path(__file__).resolve().parents[2]
CFG = PreprocessConfig()


# ------------------------------------------------------------------------- reference


def _ref_resize(img: Image.Image, size: int, mode: str, resample: int) -> Image.Image:
    w, h = img.size
    if mode == "shortest":  # torchvision _compute_resized_output_size, int size
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
    elif mode == "longest":  # open_clip ResizeKeepRatio(longest=1)
        ratio = max(h / size, w / size)
        new_h, new_w = round(h / ratio), round(w / ratio)
    else:  # squash: Resize((size, size))
        new_w, new_h = size, size
    if (new_w, new_h) == (w, h):  # torchvision returns the image untouched
        return img
    return img.resize((new_w, new_h), resample)  # F_pil.resize: no box / reducing_gap


def _ref_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision center_crop on a PIL image (pads with 0 through ImageOps.expand)."""
    from PIL import ImageOps

    w, h = img.size
    if size > w or size > h:
        ltrb = [
            (size - w) // 2 if size > w else 0,
            (size - h) // 2 if size > h else 0,
            (size - w + 1) // 2 if size > w else 0,
            (size - h + 1) // 2 if size > h else 0,
        ]
        bands = len(img.getbands())
        fill = 0 if bands == 1 else tuple([0] * bands)
        palette = img.getpalette() if img.mode == "P" else None
        img = ImageOps.expand(img, border=tuple(ltrb), fill=fill)
        if palette is not None:
            img.putpalette(palette)
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top = int(round((h - size) / 2.0))  # noqa: RUF046 - mirrors torchvision literally
    left = int(round((w - size) / 2.0))  # noqa: RUF046
    return img.crop((left, top, left + size, top + size))


def reference(
    img: Image.Image,
    size: int = 224,
    mode: str = "shortest",
    resample: int = Image.BICUBIC,
) -> np.ndarray:
    torch = pytest.importorskip("torch")
    img = _ref_resize(img, size, mode, resample)
    if mode != "squash":
        img = _ref_crop(img, size)
    img = img.convert("RGB")
    t = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    t = t.to(torch.float32).div(255)
    mean = torch.as_tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(-1, 1, 1)
    return t.sub_(mean).div_(std).numpy()


def _rand_rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random image (noise + gradients) so resampling differences show up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-40, 41, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _python(code: str, *args: str) -> str:
    """stdout of `code` run in a fresh interpreter (the repository importable), which must
    succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------- parity

SIZES = [
    (640, 480),  # landscape
    (480, 640),  # portrait
    (300, 300),  # square
    (224, 224),  # already the target: no resize
    (100, 50),  # smaller than the target (upscaled)
    (37, 91),  # small portrait, odd
    (225, 333),  # odd, crop offset .5 -> round half to even
    (451, 227),  # odd landscape
    (1001, 224),  # short side already 224: crop only
    (3, 250),  # extreme aspect ratio (224 x 18666: still resized whole)
]


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_parity_shortest_rgb(w: int, h: int) -> None:
    img = Image.fromarray(_rand_rgb(w, h, seed=w * 7 + h))
    ours = preprocess([img], CFG)
    assert ours.shape == (1, 3, 224, 224)
    assert ours.dtype == np.float32 and ours.flags["C_CONTIGUOUS"]
    assert np.abs(ours[0] - reference(img)).max() <= 1e-6


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize(("w", "h"), [(333, 200), (120, 161), (50, 50)])
def test_parity_resize_modes_and_size(mode: str, w: int, h: int) -> None:
    img = Image.fromarray(_rand_rgb(w, h, seed=3))
    cfg = PreprocessConfig(image_size=97, resize_mode=mode)
    ours = preprocess([img], cfg)
    assert ours.shape == (1, 3, 97, 97)
    assert np.abs(ours[0] - reference(img, 97, mode)).max() <= 1e-6


def test_parity_bilinear() -> None:
    img = Image.fromarray(_rand_rgb(400, 260, seed=5))
    ours = preprocess([img], PreprocessConfig(interpolation="bilinear"))
    assert np.abs(ours[0] - reference(img, resample=Image.BILINEAR)).max() <= 1e-6


# Thin images: only the crop region is resized (EXACT_RESIZE_PIXELS). One 8-bit step is
# 1/255/std in the normalised output.
STEP = 1 / 255 / min(OPENAI_CLIP_STD) + 1e-6


@pytest.mark.parametrize(
    ("w", "h", "size", "mode"),
    [
        (3, 500, 224, "RGB"),  # tall, upscaled across: horizontal pass first
        (500, 3, 224, "RGB"),  # wide
        (300, 40000, 224, "RGB"),  # tall and shrinking: Pillow >= 12.2 goes vertical first
        (40000, 300, 224, "L"),
        (7, 40000, 64, "L"),
        (2, 9000, 64, "RGB"),
        (100, 60000, 97, "RGB"),
    ],
)
def test_thin_images_resize_their_crop_only(w: int, h: int, size: int, mode: str) -> None:
    """Beyond EXACT_RESIZE_PIXELS the same pixels as resize-then-crop, up to one 8-bit step
    where the crop box's coordinates round differently (a handful of pixels)."""
    full = _ref_resize(Image.new("RGB", (w, h)), size, "shortest", Image.BICUBIC).size
    assert full[0] * full[1] > EXACT_RESIZE_PIXELS
    img = Image.fromarray(_rand_rgb(w, h, seed=w + h)).convert(mode)
    ours = preprocess([img], PreprocessConfig(image_size=size))[0]
    diff = np.abs(ours - reference(img, size))
    assert diff.max() <= STEP
    assert (diff > 1e-6).mean() < 0.005


@pytest.mark.parametrize("mode", ["RGBA", "P", "1"])
def test_thin_images_of_other_modes(mode: str) -> None:
    """Premultiplied alpha and nearest-neighbour modes through the same crop-only resize: the
    same pixels but where a coordinate rounds to the neighbouring source pixel (or, for
    RGBA, where a premultiplied step is divided by a small alpha)."""
    rgb = _rand_rgb(4, 3000, seed=9)
    img = Image.fromarray(np.dstack([rgb, 255 - rgb[..., 0]]), "RGBA")
    img = img if mode == "RGBA" else img.convert("RGB").convert(mode)
    ours = preprocess([img], PreprocessConfig(image_size=64))[0]
    diff = np.abs(ours - reference(img, 64))
    assert (diff > STEP).mean() < 0.01


def test_thin_image_memory_is_bounded(tmp_path: Path) -> None:
    """A 1 x 200,000 PNG (~1 KB) used to be resized to 224 x 44.8M pixels (~8 GB RSS) before
    the centre crop; now the whole preprocessing stays within a few MB of the interpreter."""
    path = tmp_path / "thin.png"
    Image.new("L", (1, 200_000), 128).save(path)
    assert path.stat().st_size < 5000
    code = (
        "import resource, sys\n"
        "from runtime.images import preprocess, PreprocessConfig\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for size in (64, 224):\n"
        "    for mode in ('shortest', 'squash'):\n"
        "        cfg = PreprocessConfig(image_size=size, resize_mode=mode)\n"
        "        x = preprocess([sys.argv[1]], cfg)\n"
        "        assert x.shape == (1, 3, size, size)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    assert int(_python(code, str(path))) < 50_000  # KiB


def test_longest_mode_refuses_an_image_thinner_than_a_pixel() -> None:
    img = Image.new("RGB", (1, 5000))
    with pytest.raises(ImageError, match=r"image #0: 1x5000 is too thin for resize_mode 'longest'"):
        preprocess([img], PreprocessConfig(image_size=64, resize_mode="longest"))
    assert preprocess([Image.new("RGB", (1, 100))], PreprocessConfig(64, resize_mode="longest"))[
        0
    ].shape == (3, 64, 64)


def test_batch_matches_single_images() -> None:
    imgs = [Image.fromarray(_rand_rgb(w, h, seed=w)) for w, h in SIZES[:4]]
    batch = preprocess(imgs, CFG)
    assert batch.shape == (4, 3, 224, 224)
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(batch[i], preprocess([img], CFG)[0])


def test_nhwc_array_batch() -> None:
    arr = np.stack([_rand_rgb(64, 48, seed=s) for s in range(3)])
    out = preprocess(arr, PreprocessConfig(image_size=32))
    np.testing.assert_array_equal(out, preprocess(list(arr), PreprocessConfig(image_size=32)))


# ------------------------------------------------- modes follow open_clip's op order


def _palette_image(w: int, h: int, transparency: bool) -> Image.Image:
    img = Image.fromarray(_rand_rgb(w, h, seed=11)).quantize(colors=32)
    if transparency:
        img.info["transparency"] = 0
    return img


def _rgba_image(w: int, h: int) -> Image.Image:
    rgba = np.dstack([_rand_rgb(w, h, seed=12), np.zeros((h, w), np.uint8)])
    rgba[: h // 2, :, 3] = 255  # top half opaque, bottom half fully transparent
    rgba[h // 2 :, :, :3] = (200, 10, 30)  # colour stored under the transparent area
    return Image.fromarray(rgba)


MODE_IMAGES = {
    "L": lambda: Image.fromarray(_rand_rgb(130, 90, 1)).convert("L"),
    "LA": lambda: _rgba_image(130, 90).convert("LA"),
    "P": lambda: _palette_image(130, 90, transparency=False),
    "P+transparency": lambda: _palette_image(130, 90, transparency=True),
    "RGBA": lambda: _rgba_image(130, 90),
    "CMYK": lambda: Image.fromarray(_rand_rgb(130, 90, 2)).convert("CMYK"),
    "1": lambda: Image.fromarray(_rand_rgb(130, 90, 3)).convert("1"),
}


@pytest.mark.parametrize("kind", list(MODE_IMAGES))
def test_modes_match_open_clip_order(kind: str) -> None:
    img = MODE_IMAGES[kind]()
    ours = preprocess([img], CFG)
    assert ours.shape == (1, 3, 224, 224) and np.isfinite(ours).all()
    # A lossless round trip gives the same result (decoded file == in-memory image).
    if img.mode == "CMYK":  # PNG has no CMYK
        buf = io.BytesIO()
        img.save(buf, format="TIFF")
        encoded = buf.getvalue()
    else:
        encoded = _png_bytes(img)
    assert np.abs(ours - preprocess([encoded], CFG)).max() == 0
    assert np.abs(ours[0] - reference(img)).max() <= 1e-6
    # "longest" pads in the native mode (P: palette index 0, CMYK: 0 = white), like open_clip.
    longest = preprocess([img], PreprocessConfig(resize_mode="longest"))
    assert np.abs(longest[0] - reference(img, mode="longest")).max() <= 1e-6


def test_palette_is_resized_as_indices_like_open_clip() -> None:
    """Pillow resizes P with NEAREST; converting to RGB first would give bicubic output."""
    img = _palette_image(130, 90, transparency=False)
    ours = preprocess([img], CFG)[0]
    rgb_first = reference(img.convert("RGB"))
    assert np.abs(ours - rgb_first).max() > 0.05


def test_rgba_transparent_area_not_composited() -> None:
    """convert("RGB") drops alpha: transparent pixels keep stored colour (premultiplied
    resize turns fully transparent pixels black), never a white background."""
    img = _rgba_image(224, 224)  # no resize: the stored colour survives
    ours = preprocess([img], CFG)[0]
    expected = (np.array([200, 10, 30], np.float32) / 255 - np.float32(OPENAI_CLIP_MEAN)) / (
        np.float32(OPENAI_CLIP_STD)
    )
    np.testing.assert_allclose(ours[:, -1, -1], expected, atol=1e-6)
    resized = preprocess([_rgba_image(448, 448)], CFG)[0]
    black = -np.float32(OPENAI_CLIP_MEAN) / np.float32(OPENAI_CLIP_STD)
    np.testing.assert_allclose(resized[:, -1, -1], black, atol=1e-6)


# ----------------------------------------------------- lossless equivalent encodings


def test_rgb_equivalent_inputs(tmp_path: Path) -> None:
    arr = _rand_rgb(150, 110, seed=21)
    img = Image.fromarray(arr)
    path = tmp_path / "x.png"
    img.save(path)
    want = preprocess([arr], CFG)
    for other in (img, _png_bytes(img), str(path), path, arr.astype(np.float32) / 255):
        np.testing.assert_array_equal(preprocess([other], CFG), want)
    np.testing.assert_array_equal(preprocess([arr.astype(np.float64) / 255], CFG), want)
    np.testing.assert_array_equal(preprocess([arr.astype(np.uint16) * 257], CFG), want)
    rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    np.testing.assert_allclose(preprocess([rgba], CFG), want, atol=1e-5)


def test_gray_equivalent_inputs() -> None:
    gray = _rand_rgb(120, 80, seed=4)[..., 0]
    want = preprocess([np.repeat(gray[..., None], 3, axis=2)], CFG)
    for other in (gray, gray[..., None], Image.fromarray(gray), gray.astype(np.float32) / 255):
        np.testing.assert_array_equal(preprocess([other], CFG), want)


def test_sixteen_bit_scaled_not_clipped(tmp_path: Path) -> None:
    gray = _rand_rgb(120, 80, seed=6)[..., 0]
    want = preprocess([gray], CFG)
    png16 = Image.fromarray(gray.astype(np.uint16) * 257)
    assert png16.mode.startswith("I;16")
    path = tmp_path / "g16.png"
    png16.save(path)
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(preprocess([path], CFG), want)
    np.testing.assert_array_equal(preprocess([gray.astype(np.uint16) * 257], CFG), want)
    mode_i = Image.fromarray(gray.astype(np.int32) * 257)
    assert mode_i.mode == "I"
    np.testing.assert_array_equal(preprocess([mode_i], CFG), want)
    # Pillow's plain convert (open_clip) would clip 16-bit data to almost-white.
    loaded = np.asarray(load_image(path))
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, gray)


def test_float_mode_f() -> None:
    gray = _rand_rgb(60, 40, seed=8)[..., 0]
    f = Image.fromarray(gray.astype(np.float32) / 255)
    assert f.mode == "F"
    np.testing.assert_array_equal(preprocess([f], CFG), preprocess([gray], CFG))


@pytest.mark.parametrize(
    ("orientation", "stored_from_upright"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),
        (8, Image.Transpose.ROTATE_270),
    ],
)
def test_exif_orientation(tmp_path: Path, orientation: int, stored_from_upright) -> None:
    upright = Image.fromarray(_rand_rgb(160, 100, seed=orientation))
    stored = upright.transpose(stored_from_upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    png = tmp_path / f"o{orientation}.png"
    stored.save(png, exif=exif)
    assert load_image(png).size == upright.size
    want = preprocess([upright], CFG)
    np.testing.assert_array_equal(preprocess([png], CFG), want)
    # Same with a JPEG (lossy: smooth content, compared with a tolerance).
    smooth = Image.fromarray(_rand_rgb(160, 100, seed=orientation)).resize((16, 10))
    smooth = smooth.resize((160, 100), Image.BICUBIC)
    buf = io.BytesIO()
    smooth.transpose(stored_from_upright).save(
        buf, format="JPEG", quality=95, subsampling=0, exif=exif
    )
    jpg = preprocess([buf.getvalue()], CFG)
    want = preprocess([smooth], CFG)
    assert np.abs(jpg - want).mean() < 0.05
    unrotated = preprocess([smooth.transpose(stored_from_upright)], CFG)
    assert np.abs(unrotated - want).mean() > 0.2


def test_load_image_does_not_modify_input() -> None:
    img = Image.fromarray(_rand_rgb(20, 10))
    out = load_image(img)
    assert out is not img and out.size == img.size


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros((10, 12), np.uint8),
        lambda: np.zeros((10, 12, 3), np.uint8),
        lambda: np.zeros((10, 12, 4), np.uint8),
        lambda: np.zeros((10, 12, 3), np.uint16),
        lambda: np.ones((10, 12, 4), np.float32),
        lambda: np.zeros((10, 12), np.float64),
        lambda: Image.new("I;16", (9, 7), 40000),
        lambda: Image.new("PA", (9, 7)),
        lambda: Image.new("YCbCr", (9, 7)),
        lambda: Image.new("RGBX", (9, 7)),
        lambda: Image.new("HSV", (9, 7)),
    ],
)
def test_all_inputs_give_finite_batches(make) -> None:
    out = preprocess([make(), make()], PreprocessConfig(image_size=16))
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.flags["C_CONTIGUOUS"]


# ---------------------------------------------------------------------------- errors


def _truncated_png() -> bytes:
    data = _png_bytes(Image.fromarray(_rand_rgb(200, 200)))
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rand_rgb(200, 200)).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg.*not found"):
        load_image(missing)
    with pytest.raises(ImageError, match=r"image #1 \(.*nope\.jpg\).*not found"):
        preprocess([_rand_rgb(8, 8), missing], CFG)


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    """A folder, a FIFO or a device is refused on the opened descriptor, at once (a FIFO used
    to block `run --image` forever)."""
    with pytest.raises(ImageError, match="is a folder, not a regular file"):
        load_image(tmp_path)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"pipe\.png.*is a FIFO, not a regular file"):
        load_image(fifo)
    with pytest.raises(ImageError, match=r"image #0 \(/dev/null\).*is a device"):
        preprocess(["/dev/null"], CFG)


def test_only_raster_formats_are_decoded(tmp_path: Path, monkeypatch) -> None:
    """EPS bytes are refused before Pillow hands them to Ghostscript (a `gs` on PATH that
    records being run stays silent)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {tmp_path / 'gs-ran'}\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not an image in a supported format"):
        load_image(eps)
    (tmp_path / "x.eps").write_bytes(eps)
    with pytest.raises(ImageError, match=r"x\.eps.*not an image in a supported format"):
        load_image(tmp_path / "x.eps")
    assert not (tmp_path / "gs-ran").exists()


def test_pixel_count_refused_from_the_header(monkeypatch) -> None:
    """Over Pillow's decompression-bomb threshold (where Pillow itself only warns) an image is
    refused before it is decoded: a tiny 1-bit PNG can declare a huge canvas."""
    buf = io.BytesIO()
    Image.new("1", (300, 200)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(ImageError, match=r"too large \(300x200 = 60,000 pixels; at most 59,999\)"):
        load_image(buf.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200)
    assert load_image(buf.getvalue()).size == (300, 200)


@pytest.mark.parametrize("data", [_truncated_png(), _truncated_jpeg()])
def test_truncated_files(tmp_path: Path, data: bytes) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = tmp_path / "cut.img"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"cut\.img.*(truncated|corrupt)"):
        load_image(path)
    with pytest.raises(ImageError, match=r"image #0.*(truncated|corrupt)"):
        preprocess([data], CFG)
    lazy = Image.open(io.BytesIO(data))  # a lazily opened, truncated PIL image
    with pytest.raises(ImageError, match="image #0"):
        preprocess([lazy], CFG)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.txt.*not an image in a supported format"):
        load_image(path)
    with pytest.raises(ImageError, match=r"image #0.*empty bytes"):
        preprocess([b""], CFG)


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (np.zeros((0, 10, 3), np.uint8), "zero-size"),
        (np.zeros((10, 0), np.uint8), "zero-size"),
        (Image.new("RGB", (0, 5)), "zero-size"),
        (np.zeros((4, 4, 5), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros(7, np.uint8), "shape"),
        (np.zeros((4, 4, 3), np.int32), "dtype"),
        (np.zeros((4, 4), bool), "dtype"),
        (np.full((4, 4), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
        (12345, "unsupported input type int"),
    ],
)
def test_bad_inputs_name_the_image(bad, pattern: str) -> None:
    with pytest.raises(ImageError, match=rf"image #2: .*{pattern}"):
        preprocess([_rand_rgb(8, 8), _rand_rgb(9, 9), bad], CFG)


def test_empty_and_non_sequence_inputs() -> None:
    with pytest.raises(ImageError, match="no images"):
        preprocess([], CFG)
    assert image_list([], allow_empty=True) == []
    for single in ("photo.jpg", Path("photo.jpg"), b"\x89PNG", Image.new("RGB", (2, 2))):
        with pytest.raises(ImageError, match=r"got \w+; wrap a single image in a list"):
            image_list(single, allow_empty=True)
    with pytest.raises(ImageError, match="wrap a single image"):
        preprocess("photo.jpg", CFG)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="wrap a single image"):
        preprocess(_rand_rgb(8, 8), CFG)  # type: ignore[arg-type]


def test_load_image_custom_name() -> None:
    with pytest.raises(ImageError, match=r"^demo-3: "):
        load_image(np.zeros((3, 3), np.int64), name="demo-3")


# ---------------------------------------------------------------------------- config


def test_config_roundtrip_and_validation() -> None:
    cfg = PreprocessConfig(image_size=336, interpolation="bilinear", resize_mode="squash")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()) == PreprocessConfig()
    assert PreprocessConfig().mean == (0.48145466, 0.4578275, 0.40821073)
    assert PreprocessConfig().std == (0.26862954, 0.26130258, 0.27577711)
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "fill_color": 0})
    for bad in (
        {"image_size": 0},
        {"image_size": 2.5},
        {"mean": (0.5, 0.5)},
        {"std": (1.0, 0.0, 1.0)},
        {"interpolation": "nearest"},
        {"resize_mode": "crop"},
    ):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)


# ----------------------------------------------------------------------- torch-free


def test_imports_without_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'transformers'):\n"
        "    sys.modules[m] = None\n"
        "import numpy as np\n"
        "import runtime.images as ri, runtime.prompts as rp\n"
        "x = ri.preprocess([np.zeros((5, 7, 3), np.uint8)], ri.PreprocessConfig(image_size=8))\n"
        "assert x.shape == (1, 3, 8, 8)\n"
        "assert rp.count_media(rp.MEDIA_TOKEN * 2) == 2\n"
        "print('ok')\n"
    )
    assert _python(code).strip() == "ok"
