"""Torch-free image loading and OpenFlamingo / open_clip eval preprocessing (numpy, Pillow).

:func:`preprocess` reproduces the CLIP ViT-L/14 eval transform OpenFlamingo gets from
``open_clip.create_model_and_transforms``: Resize(shortest side, BICUBIC) -> CenterCrop ->
``convert("RGB")`` -> ToTensor -> Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), in that order
and on the image in its decoded mode, because the order is observable (palette images resize as
indices, RGBA with premultiplied alpha and no compositing). Deliberate differences: EXIF
orientation is applied, 16/32-bit integer images are scaled by ``round(v / 257)`` instead of
clipped, float data must lie in [0, 1]. An unusable image is an :class:`ImageError` naming it.
Details and reasons: docs/preprocessing.md.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageOps

from .errors import FlamingoExportError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageError",
    "ImageInput",
    "PreprocessConfig",
    "image_list",
    "load_image",
    "preprocess",
    "preprocess_one",
    "source_key",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

# Largest intermediate image (pixels) of a "shortest" resize done whole, as torchvision does;
# thinner images resize only their crop region (see _geometry).
EXACT_RESIZE_PIXELS = 1 << 22

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0}  # Pillow's filters
# Pillow >= 12.2 resizes tall images (height > 100 x width, shrinking) vertically first.
_TALL_VERTICAL_FIRST = tuple(int(p) for p in PIL.__version__.split(".")[:2]) >= (12, 2)
_RESIZE_MODES = ("shortest", "longest", "squash")
# Modes that go through resize/crop unchanged and are converted to RGB at the end, like
# open_clip does.  Everything else is first normalised by _normalise_mode.
_NATIVE_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


class ImageError(FlamingoExportError, ValueError):
    """An input image could not be used; the message names the input and the problem."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of the open_clip eval transform; stored in the export manifest.

    ``resize_mode`` follows open_clip: ``"shortest"`` (the CLIP default: shortest side to
    ``image_size`` then centre crop), ``"longest"`` (longest side to ``image_size`` then
    centre crop/pad with 0), ``"squash"`` (resize to a square, no crop).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"image_size must be a positive int, got {size!r}")
        object.__setattr__(self, "image_size", int(size))
        for key in ("mean", "std"):
            value = getattr(self, key)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be 3 numbers, got {value!r}") from None
            if len(value) != 3 or not all(np.isfinite(value)):
                raise ValueError(f"{key} must be 3 finite numbers, got {value!r}")
            object.__setattr__(self, key, value)
        if any(s == 0.0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"resize_mode must be one of {list(_RESIZE_MODES)}, got {self.resize_mode!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists) for the export manifest."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused rather than silently ignored,
        since a field this runtime does not know could change the preprocessing."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocess config keys: {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------- loading


def _default_name(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "<bytes input>"
    if isinstance(image, np.ndarray):
        return "<ndarray input>"
    if isinstance(image, Image.Image):
        return "<PIL image input>"
    return f"<{type(image).__name__} input>"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode(fp: Any, name: str) -> Image.Image:
    """Open, fully decode and EXIF-transpose; every failure becomes an ImageError."""
    try:
        with Image.open(fp) as im:
            # .load() forces the full decode so truncated files fail here (Pillow's
            # ImageFile.LOAD_TRUNCATED_IMAGES is left at its default, False).
            im.load()
            return _exif_transpose(im, name)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image file") from None
    except PermissionError as e:
        raise ImageError(f"{name}: cannot read file ({_describe(e)})") from e
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large ({e})") from e
    except Exception as e:  # Pillow plugins raise OSError, SyntaxError, ValueError, ...
        raise ImageError(
            f"{name}: cannot decode image, truncated or corrupt? ({_describe(e)})"
        ) from e


def _exif_transpose(im: Image.Image, name: str) -> Image.Image:
    """Apply EXIF orientation; always returns a new image (never the caller's object)."""
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as e:  # a malformed EXIF block should not reject a decodable image
        warnings.warn(f"{name}: ignoring unreadable EXIF data ({_describe(e)})", stacklevel=3)
        out = None
    return out if out is not None else im.copy()


def _u16_to_u8(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 as round(v / 257); exact at both ends, no overflow."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((v + 128) // 257).astype(np.uint8)


def _float_to_u8(values: np.ndarray, name: str) -> np.ndarray:
    v = values.astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ImageError(f"{name}: float image contains NaN or infinite values")
    lo, hi = float(v.min()), float(v.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageError(f"{name}: float image values must lie in [0, 1], got [{lo:g}, {hi:g}]")
    return np.rint(v * 255.0).astype(np.uint8)


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    shape = arr.shape
    if arr.ndim == 3 and shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (2, 3, 4))):
        raise ImageError(
            f"{name}: array must be HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA), got shape {shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: zero-size image (array shape {shape})")
    if arr.dtype == np.uint8:
        data = arr
    elif arr.dtype == np.uint16:
        data = _u16_to_u8(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        data = _float_to_u8(arr, name)
    else:
        raise ImageError(
            f"{name}: unsupported array dtype {arr.dtype} (use uint8, uint16 or float in [0, 1])"
        )
    return Image.fromarray(np.ascontiguousarray(data))


def _normalise_mode(im: Image.Image, name: str) -> Image.Image:
    """Bring rare modes into one of _NATIVE_MODES (8 bits per band)."""
    mode = im.mode
    if mode in _NATIVE_MODES:
        return im
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_u16_to_u8(np.asarray(im)))
    if mode == "F":
        return Image.fromarray(_float_to_u8(np.asarray(im), name))
    target = {"PA": "RGBA", "La": "LA", "RGBa": "RGBA"}.get(mode, "RGB")
    try:
        return im.convert(target)
    except Exception as e:
        raise ImageError(f"{name}: unsupported image mode {mode!r} ({_describe(e)})") from e


def load_image(image: ImageInput, *, name: str | None = None) -> Image.Image:
    """Decode ``image`` into a fully loaded PIL image with EXIF orientation applied.

    Accepts a file path, encoded bytes, a PIL image or a numpy array (HxW gray, HxWx3 RGB,
    HxWx4 RGBA; uint8, uint16, or float in [0, 1]).  The result is a new image in an 8-bit
    mode that :func:`preprocess` handles like open_clip (the input object is never modified).
    ``name`` is used in error messages; it defaults to the path or the input's type.
    Raises :class:`ImageError` for every unusable input.
    """
    label = name if name is not None else _default_name(image)
    if isinstance(image, (str, os.PathLike)):
        im = _decode(os.fspath(image), label)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageError(f"{label}: empty bytes")
        im = _decode(io.BytesIO(bytes(image)), label)
    elif isinstance(image, Image.Image):
        try:
            image.load()  # lazily opened images: surface truncation now
        except Exception as e:
            raise ImageError(
                f"{label}: cannot decode image, truncated or corrupt? ({_describe(e)})"
            ) from e
        im = _exif_transpose(image, label)
    elif isinstance(image, np.ndarray):
        im = _from_array(image, label)
    else:
        raise ImageError(
            f"{label}: unsupported input type {type(image).__name__} "
            "(expected a path, bytes, PIL.Image.Image or numpy.ndarray)"
        )
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{label}: zero-size image ({im.width}x{im.height})")
    return _normalise_mode(im, label)


# ------------------------------------------------------------------------ preprocessing


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after torchvision ``Resize(int)``: short side -> size, long side truncated
    (``int(size * long / short)``, as in ``_compute_resized_output_size``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _longest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after open_clip ``ResizeKeepRatio(size, longest=1)``: Python ``round``."""
    ratio = max(height / size, width / size)
    return round(width / ratio), round(height / ratio)


def _pad(im: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    """Constant 0 padding in the image's own mode, like torchvision's PIL ``pad`` (for ``P``
    that is palette index 0; for ``CMYK`` it becomes white after conversion)."""
    bands = len(im.getbands())
    fill: int | tuple[int, ...] = 0 if bands == 1 else (0,) * bands
    out = Image.new(im.mode, (left + im.width + right, top + im.height + bottom), fill)
    if im.mode == "P":
        palette = im.getpalette()
        if palette is not None:
            out.putpalette(palette)
    out.paste(im, (left, top))
    return out


def _center_crop(im: Image.Image, size: int) -> Image.Image:
    """torchvision ``center_crop``: pad (left/top get the floor half) when smaller, then
    crop at ``int(round((dim - size) / 2.0))`` -- Python's round-half-to-even."""
    width, height = im.size
    if size > width or size > height:
        dw, dh = max(size - width, 0), max(size - height, 0)
        im = _pad(im, dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2)
        width, height = im.size
        if width == size and height == size:
            return im
    top = round((height - size) / 2.0)  # round() of a float already returns an int
    left = round((width - size) / 2.0)
    return im.crop((left, top, left + size, top + size))


def _to_rgb(im: Image.Image) -> Image.Image:
    """open_clip's ``_convert_to_rgb``: a plain ``convert("RGB")`` (alpha dropped)."""
    if im.mode == "RGB":
        return im
    with warnings.catch_warnings():
        # P images whose tRNS holds per-index alpha warn here; RGB output ignores alpha.
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        return im.convert("RGB")


def _shortest_side_box(im: Image.Image, size: int) -> tuple[float, float, float, float]:
    """The region of `im` that torchvision's Resize(size) + CenterCrop(size) keep, in source
    pixels (the resized image is at least `size` on both sides: no padding)."""
    target_w, target_h = _shortest_side_size(im.width, im.height, size)
    left = round((target_w - size) / 2.0)
    top = round((target_h - size) / 2.0)
    sx, sy = im.width / target_w, im.height / target_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def _resize_region(
    im: Image.Image, size: int, resample: int, box: tuple[float, float, float, float]
) -> Image.Image:
    """`size` x `size` pixels of `im` resized so that `box` (source pixels) fills them, as the
    whole-image resize computes them, reading only a window around the box.

    Pillow resizes in two separable passes (horizontal first; from 12.2 vertical first for
    images taller than 100x their width whose height shrinks), each rounding to 8 bits, and
    premultiplies alpha once; this takes the same passes in the same order on the window, with
    the box relative to it (Pillow parses boxes as float32: small coordinates keep them exact
    to ~1e-5 px). Palette and bilevel images use Pillow's single nearest-neighbour mapping.
    """
    x0, y0, x1, y1 = box
    support = _SUPPORT.get(resample, 0.0)

    def window(lo: float, hi: float, limit: int) -> tuple[int, int]:
        reach = support * max((hi - lo) / size, 1.0) + 2  # the filter's taps, and a margin
        return max(0, math.floor(lo - reach)), min(limit, math.ceil(hi + reach))

    (left, right), (top, bottom) = window(x0, x1, im.width), window(y0, y1, im.height)
    work = im.crop((left, top, right, bottom))
    x0, x1, y0, y1 = x0 - left, x1 - left, y0 - top, y1 - top
    if im.mode in ("1", "P"):  # Pillow forces NEAREST: one affine mapping, no passes
        return work.resize((size, size), resample=resample, box=(x0, y0, x1, y1))
    premultiplied = {"LA": "La", "RGBA": "RGBa"}.get(im.mode)
    if premultiplied:
        work = work.convert(premultiplied)
    w, h = work.size
    target_h = _shortest_side_size(im.width, im.height, size)[1]
    if _TALL_VERTICAL_FIRST and im.height > im.width * 100 and target_h < im.height:
        work = work.resize((w, size), resample=resample, box=(0, y0, w, y1))
        work = work.resize((size, size), resample=resample, box=(x0, 0, x1, size))
    else:
        work = work.resize((size, h), resample=resample, box=(x0, 0, x1, h))
        work = work.resize((size, size), resample=resample, box=(0, y0, size, y1))
    return work.convert(im.mode) if premultiplied else work


def _geometry(im: Image.Image, config: PreprocessConfig, name: str) -> Image.Image:
    """Resize + centre crop (or squash) to image_size, with memory bounded for any aspect
    ratio. "shortest" resizes the whole image, like torchvision, while that intermediate holds
    at most EXACT_RESIZE_PIXELS; a thinner image (a 1 x 200,000 PNG would become 224 x 44.8M)
    has only the region the crop keeps resized (`resize(box=...)`: the same source-pixel mapping
    and filter taps, pixels outside the box included), equal to resize-then-crop up to one
    8-bit step where the box coordinates round differently.
    """
    size = config.image_size
    resample = _INTERPOLATIONS[config.interpolation]
    if config.resize_mode == "shortest":
        target = _shortest_side_size(im.width, im.height, size)
        if target[0] * target[1] > EXACT_RESIZE_PIXELS:
            return _resize_region(im, size, resample, _shortest_side_box(im, size))
    elif config.resize_mode == "longest":
        target = _longest_side_size(im.width, im.height, size)
        if min(target) < 1:
            raise ImageError(
                f"{name}: {im.width}x{im.height} is too thin for resize_mode 'longest' at "
                f"{size} px (its short side would be {min(target)} px)"
            )
    else:  # squash
        target = (size, size)
    if target != im.size:
        # torchvision's PIL backend calls exactly img.resize(size, interpolation): no box,
        # no reducing_gap; Pillow's BICUBIC/BILINEAR always antialias when downscaling.
        im = im.resize(target, resample=resample)
    if config.resize_mode != "squash":
        im = _center_crop(im, size)
    return im


def image_list(images: Any, *, allow_empty: bool = False) -> list[Any]:
    """`images` as a list: a sequence of images (or an NxHxWxC array). A single image (a path,
    bytes, a PIL image, an HxWxC array) is refused with ImageError rather than read as a
    sequence (a path would become its characters); so is an empty one unless `allow_empty`."""
    single = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)
    if isinstance(images, single) or (isinstance(images, np.ndarray) and images.ndim != 4):
        raise ImageError(
            "expected a sequence of images (a list, or an NxHxWxC array), got "
            f"{type(images).__name__}; wrap a single image in a list"
        )
    try:
        batch = list(images)
    except TypeError:
        raise ImageError(f"expected a sequence of images, got {type(images).__name__}") from None
    if not batch and not allow_empty:
        raise ImageError("no images given (empty sequence)")
    return batch


def preprocess(images: Sequence[ImageInput], config: PreprocessConfig) -> np.ndarray:
    """Load and preprocess a batch into the vision encoder input.

    Returns a C-contiguous float32 array of shape (N, 3, S, S) equal (to float32 rounding) to
    stacking open_clip's eval transform over the images.  Errors name the offending input as
    ``image #i`` (plus its path for path inputs).
    """
    batch = image_list(images)
    size = config.image_size
    out = np.empty((len(batch), 3, size, size), dtype=np.float32)
    for i, item in enumerate(batch):
        out[i] = preprocess_one(item, config, f"image #{i}")
    return out


def preprocess_one(item: ImageInput, config: PreprocessConfig, name: str) -> np.ndarray:
    """One image -> (3, S, S) float32 (`preprocess` of a batch of one); `name` (plus the path
    of a path input) is how errors name it."""
    if isinstance(item, (str, os.PathLike)):
        name += f" ({os.fspath(item)})"
    size = config.image_size
    im = load_image(item, name=name)
    try:
        im = _to_rgb(_geometry(im, config, name))
    except ImageError:
        raise
    except (ValueError, OSError, MemoryError) as e:  # Pillow's resize/convert failures
        raise ImageError(f"{name}: cannot preprocess the image ({_describe(e)})") from e
    if im.size != (size, size):  # defensive: geometry must give the crop size
        raise ImageError(f"{name}: internal error, got {im.size} after preprocessing")
    # ToTensor: uint8 HWC -> float32 CHW / 255, then Normalize: (x - mean) / std.
    chw = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    chw /= np.float32(255.0)
    chw -= np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
    chw /= np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)
    return chw


def source_key(item: ImageInput) -> tuple[Any, ...] | None:
    """What identifies an encoded image without decoding it, or None where nothing cheap does
    (PIL images and arrays can change in place).

    A path: its real path, device, inode, size and modification and change times in ns (a file
    rewritten or replaced changes at least one; `os.utime` cannot set the change time).
    Bytes: their sha256. A path that cannot be stat'ed gives None (loading then says why).
    """
    if isinstance(item, (str, os.PathLike)):
        try:
            path = os.path.realpath(os.fspath(item))
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return ("path", path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.sha256(item).hexdigest())
    return None
