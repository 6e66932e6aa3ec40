"""Video clips as media items: frames read, sampled uniformly and preprocessed like images.

A clip fills one `<image>` marker, like an image: the vision graph encodes its F frames and the
resampler turns all of them (with the model's frame embeddings) into one set of latents. An
image is a media item of one frame. A clip is a :class:`Video` whose source is

* a video file, decoded by PyAV (the optional ``video`` extra: ``pip install
  'flamingo-export[video]'``; the runtime imports without it);
* an animated image (GIF, APNG, animated WebP) or a still one (a one-frame clip), by Pillow;
* a folder of frame images, in file-name order (``frame_001.png``, ... : zero-pad the numbers),
  by Pillow; hidden files and files whose suffix Pillow does not know are skipped;
* a sequence of frames (paths, bytes, PIL images or arrays: what ``load_image`` takes).

Frame sampling (:func:`sample_indices`): F of a clip's T frames, uniformly: the centres of F
equal segments, frame ``floor((i + 0.5) * T / F)`` for i = 0..F-1 (F = T: every frame; F = 1:
the middle one). Only the sampled frames are converted and preprocessed. F is the clip's
``num_frames``, else the export's ``max_frames``. Errors (:class:`VideoError`, an ImageError)
name the clip: unreadable or empty, shorter than F frames, more frames than the export allows.
Details: docs/video.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import ImageError, ImageInput, PreprocessConfig, preprocess_one

__all__ = [
    "Video",
    "VideoError",
    "encode_media",
    "frame_count",
    "preprocess_clip",
    "preprocess_media",
    "read_frames",
    "sample_indices",
]

VIDEO_EXTRA = "pip install 'flamingo-export[video]'"


class VideoError(ImageError):
    """A clip cannot be used: unreadable, empty, too short, or too long for the export."""


@dataclass(frozen=True)
class Video:
    """A clip as a media item (a prompt's `<image>` marker takes an image or a Video).

    `source`: a video file, an animated image, a folder of frame images (a path), or a
    sequence of frames. `num_frames`: how many frames to sample (None: the export's
    max_frames). Nothing is read until the clip is preprocessed.
    """

    source: Any
    num_frames: int | None = None

    def __post_init__(self) -> None:
        n = self.num_frames
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise VideoError(f"{self.name}: num_frames must be an int >= 1, got {n!r}")
        src = self.source
        if isinstance(src, (bytes, bytearray, memoryview, Image.Image)):
            raise VideoError(
                f"{self.name}: a clip's source is a path (video file, animated image, folder of "
                "frames) or a sequence of frames, got a single image"
            )
        if not isinstance(src, (str, os.PathLike)):
            if isinstance(src, np.ndarray) and src.ndim not in (3, 4):
                raise VideoError(
                    f"{self.name}: a frame array must be FxHxW or FxHxWxC, got shape {src.shape}"
                )
            try:
                len(src)
            except TypeError:
                raise VideoError(
                    f"{self.name}: a clip's source is a path or a sequence of frames, got "
                    f"{type(src).__name__}"
                ) from None

    @property
    def name(self) -> str:
        """How errors name the clip: its path, or the kind of sequence."""
        if isinstance(self.source, (str, os.PathLike)):
            return f"clip {os.fspath(self.source)}"
        return f"clip <{type(self.source).__name__} of frames>"

    def __str__(self) -> str:
        if isinstance(self.source, (str, os.PathLike)):
            return os.fspath(self.source)
        return self.name


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The frames sampled from a clip of `total`: centres of `num_frames` equal segments,
    `floor((i + 0.5) * total / num_frames)`, increasing (integer arithmetic, exact)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total < num_frames:
        raise ValueError(f"{total} frames cannot give {num_frames}")
    return [((2 * i + 1) * total) // (2 * num_frames) for i in range(num_frames)]


# ------------------------------------------------------------------ sources


Frames = tuple[int, Callable[[Sequence[int]], list[Any]]]  # (T, indices -> frames)


def _folder_frames(folder: Path, name: str) -> Frames:
    known = Image.registered_extensions()
    try:
        files = sorted(
            p for p in folder.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in known and not p.is_dir()
        )  # fmt: skip
    except OSError as e:
        raise VideoError(f"{name}: cannot list the folder ({e.strerror})") from e
    for p in files:  # a frame that is named but cannot be read would silently shift the clip
        if not p.is_file():
            raise VideoError(
                f"{name}: frame {p.name} is not a regular file (a broken symlink, a FIFO?)"
            )
    return len(files), lambda idx: [files[i] for i in idx]


def _pillow_frames(image: Image.Image, name: str) -> Frames:
    """An opened (animated) image: frames by `seek`, each a copy in Pillow's mode."""
    total = int(getattr(image, "n_frames", 1))

    def take(indices: Sequence[int]) -> list[Any]:
        out = []
        for i in indices:
            try:
                image.seek(i)
                image.load()
            except Exception as e:  # truncated or corrupt frame data
                raise VideoError(
                    f"{name}: cannot decode frame {i} ({type(e).__name__}: {e})"
                ) from None
            out.append(image.copy())
        return out

    return total, take


def _import_av(name: str) -> Any:
    try:
        import av
    except ImportError:
        raise VideoError(
            f"{name}: reading a video file needs PyAV, the optional 'video' extra: "
            f"{VIDEO_EXTRA} (animated GIFs and folders of frame images need only Pillow)"
        ) from None
    return av


def _av_frames(path: str, name: str) -> Frames:
    """A video file's first video stream by PyAV: one pass counts its frames, a second keeps
    the sampled ones (only those are converted to RGB)."""
    av = _import_av(name)

    def decode(keep: set[int] | None) -> tuple[int, dict[int, Any]]:
        kept: dict[int, Any] = {}
        count = 0
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoError(f"{name}: the file has no video stream")
                for count, frame in enumerate(container.decode(video=0), start=1):
                    if keep is not None and count - 1 in keep:
                        kept[count - 1] = frame.to_image()
                        if len(kept) == len(keep):
                            break
        except VideoError:
            raise
        except Exception as e:  # av.FFmpegError subclasses, plus OSError from the demuxer
            raise VideoError(f"{name}: cannot decode the video ({type(e).__name__}: {e})") from None
        return count, kept

    total, _ = decode(None)

    def take(indices: Sequence[int]) -> list[Any]:
        _, kept = decode(set(indices))
        missing = [i for i in indices if i not in kept]
        if missing:
            raise VideoError(f"{name}: frame {missing[0]} could not be decoded a second time")
        return [kept[i] for i in indices]

    return total, take


def _frames(video: Video) -> Frames:
    src, name = video.source, video.name
    if not isinstance(src, (str, os.PathLike)):
        frames = list(src)
        return len(frames), lambda idx: [frames[i] for i in idx]
    path = Path(src)
    if path.is_dir():
        return _folder_frames(path, name)
    if not path.exists():
        raise VideoError(f"{name}: file not found")
    try:
        image = Image.open(path)
    except Image.UnidentifiedImageError:
        return _av_frames(str(path), name)  # not an image format: a video file
    except OSError as e:
        raise VideoError(f"{name}: cannot read file ({type(e).__name__}: {e})") from e
    return _pillow_frames(image, name)


def frame_count(video: Video) -> int:
    """Frames the clip has (a video file is decoded once to count them)."""
    return _frames(video)[0]


def read_frames(video: Video, num_frames: int) -> list[Any]:
    """The `num_frames` frames sampled from the clip (:func:`sample_indices`), in clip order,
    each something `load_image` takes. VideoError if the clip is empty or shorter."""
    total, take = _frames(video)
    if total == 0:
        raise VideoError(f"{video.name}: no frames (empty video, GIF or folder)")
    if total < num_frames:
        raise VideoError(
            f"{video.name}: has {total} frame{'s' if total != 1 else ''}, {num_frames} were "
            "asked (sample fewer: num_frames / --num-frames)"
        )
    return take(sample_indices(total, num_frames))


# ------------------------------------------------------------------ preprocessing, encoding


def preprocess_media(
    items: Sequence[ImageInput | Video], config: PreprocessConfig, max_frames: int
) -> list[np.ndarray]:
    """Each media item as float32 frames (F, 3, S, S): an image is F = 1; a clip's sampled
    frames are each preprocessed like an image (:func:`preprocess_clip`)."""
    return [
        preprocess_clip(item, config, max_frames, i)
        if isinstance(item, Video)
        else preprocess_one(item, config, f"image #{i}")[None]
        for i, item in enumerate(items)
    ]


def preprocess_clip(
    video: Video, config: PreprocessConfig, max_frames: int, index: int
) -> np.ndarray:
    """Media item number `index` (how errors name it), a clip: its sampled frames, each
    preprocessed like an image, (F, 3, S, S) float32. F is the clip's `num_frames`, else
    `max_frames` (the export's); more than `max_frames` is a VideoError."""
    label = f"media #{index} ({video.name})"
    asked = video.num_frames
    if asked is None and max_frames == 1:
        raise VideoError(
            f"{label}: this export takes 1 frame per media item (max_frames 1: a model "
            "without frame embeddings, exported without --max-frames); give the clip "
            "num_frames=1 (its middle frame; `run --num-frames 1`), or re-export with "
            "--max-frames F"
        )
    frames = asked or max_frames
    if frames > max_frames:
        raise VideoError(
            f"{label}: {frames} frames asked, this export allows at most {max_frames} "
            "per clip (max_frames)"
        )
    images = read_frames(video, frames)
    return np.stack([preprocess_one(f, config, f"{label} frame {j}") for j, f in enumerate(images)])


def encode_media(
    encode: Callable[[np.ndarray], dict[str, np.ndarray]], media: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Vision outputs of media items with any mix of frame counts, in item order: one
    `encode((n, F, 3, S, S))` call per distinct F (the vision graph takes one frame count per
    run), outputs stacked back to (N, ...) like a single call's."""
    groups: dict[int, list[int]] = {}
    for i, pixels in enumerate(media):
        groups.setdefault(int(pixels.shape[0]), []).append(i)
    parts: dict[str, list[Any]] = {}
    for members in groups.values():
        outputs = encode(np.stack([media[i] for i in members]))
        for name, value in outputs.items():
            slots = parts.setdefault(name, [None] * len(media))
            for k, i in enumerate(members):
                slots[i] = value[k]
    return {name: np.stack(values) for name, values in parts.items()}
