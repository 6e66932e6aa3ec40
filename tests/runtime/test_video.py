"""runtime.video: the frame-sampling rule, the clip sources (video file through PyAV, animated
GIF and frame folders through Pillow, frame sequences) agreeing frame for frame, preprocessing
of mixed media, vision runs grouped by frame count, and the errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.images import PreprocessConfig, preprocess
from runtime.video import (
    Video,
    VideoError,
    encode_media,
    frame_count,
    preprocess_media,
    read_frames,
    sample_indices,
)

FRAMES = 9


def _frames(n: int = FRAMES, size: tuple[int, int] = (40, 32)) -> list[Image.Image]:
    """Frames that differ: a bar moving right over a noisy background of 64 colours (a GIF's
    palette holds them all: exact), and the frame number in the first pixel's red channel."""
    rng = np.random.default_rng(0)
    base = (60 * rng.integers(0, 4, (size[1], size[0], 3))).astype(np.uint8)
    out = []
    for i in range(n):
        a = base.copy()
        a[:, 2 + 3 * i : 6 + 3 * i] = (250, 20, 20)
        a[0, 0, 0] = 10 * i
        out.append(Image.fromarray(a))
    return out


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, Path]:
    from demo.task import save_clip

    folder = tmp_path_factory.mktemp("clips")
    frames = _frames()
    gif = save_clip(frames, folder / "clip.gif")
    frame_dir = folder / "frames"
    frame_dir.mkdir()
    for i, im in enumerate(frames):
        im.save(frame_dir / f"frame_{i:03d}.png")
    (frame_dir / ".hidden.png").write_bytes(b"not read")
    (frame_dir / "notes.txt").write_text("not a frame")
    return {"gif": gif, "folder": frame_dir}


def test_sample_indices_is_uniform() -> None:
    assert sample_indices(9, 4) == [1, 3, 5, 7]
    assert sample_indices(12, 4) == [1, 4, 7, 10]
    assert sample_indices(9, 1) == [4]  # the middle frame
    assert sample_indices(5, 5) == [0, 1, 2, 3, 4]  # every frame
    for total in range(1, 40):
        for n in range(1, total + 1):
            got = sample_indices(total, n)
            assert got == sorted(set(got)) and got[0] >= 0 and got[-1] < total
            # the centre of segment i of F equal parts, floored (exact: no float rounding)
            assert got == [int(np.floor((i + 0.5) * total / n)) for i in range(n)]
    with pytest.raises(ValueError):
        sample_indices(3, 4)


@pytest.mark.parametrize("source", ["gif", "folder", "list", "video"])
def test_sources_give_the_sampled_frames(clip_files, tmp_path, source: str) -> None:
    frames = _frames()
    if source == "video":
        src: object = _write_video(frames, tmp_path / "clip.mkv")
    elif source == "list":
        src = frames
    else:
        src = clip_files[source]
    clip = Video(src)
    assert frame_count(clip) == FRAMES
    got = [np.asarray(Image.open(f) if isinstance(f, Path) else f.convert("RGB"), np.int64)
           for f in read_frames(clip, 4)]  # fmt: skip
    want = [np.asarray(frames[i], np.int64) for i in (1, 3, 5, 7)]
    tolerance = 3 if source == "video" else 0  # a video codec's colour conversion rounds
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= tolerance


def _write_video(frames: list[Image.Image], path: Path) -> Path:
    """A lossless FFV1 video (PyAV): decoded frames equal the written ones up to RGB<->YUV."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv444p"
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_clip_errors_name_the_clip(clip_files, tmp_path) -> None:
    with pytest.raises(VideoError, match=r"clip .*missing\.mp4: file not found"):
        read_frames(Video(tmp_path / "missing.mp4"), 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match=r"empty.*no frames"):
        read_frames(Video(empty), 1)
    with pytest.raises(VideoError, match=r"clip\.gif: has 9 frames, 12 were asked"):
        read_frames(Video(clip_files["gif"]), 12)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(VideoError, match=r"broken\.mp4: cannot decode the video"):
        read_frames(Video(broken), 1)
    with pytest.raises(VideoError, match="num_frames must be an int >= 1"):
        Video(clip_files["gif"], num_frames=0)
    dangling = tmp_path / "dangling"
    shutil.copytree(clip_files["folder"], dangling)
    (dangling / "sub.png").mkdir()  # a folder is skipped like a hidden file
    assert frame_count(Video(dangling)) == FRAMES
    (dangling / "frame_004b.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(VideoError, match=r"frame frame_004b\.png is not a regular file"):
        read_frames(Video(dangling), 2)
    with pytest.raises(VideoError, match="got a single image"):
        Video(Image.new("RGB", (4, 4)))
    with pytest.raises(VideoError, match="FxHxW or FxHxWxC"):
        Video(np.zeros((4, 4)))


def test_a_video_file_without_pyav_names_the_extra(clip_files, tmp_path, monkeypatch) -> None:
    """The runtime imports without PyAV; only a video file needs it, GIFs and folders not."""
    monkeypatch.setitem(sys.modules, "av", None)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(VideoError, match=r"needs PyAV.*pip install 'flamingo-export\[video\]'"):
        read_frames(Video(clip), 1)
    assert len(read_frames(Video(clip_files["gif"]), 2)) == 2
    assert len(read_frames(Video(clip_files["folder"]), 2)) == 2


def test_preprocess_media_frames_like_images(clip_files) -> None:
    config = PreprocessConfig(image_size=24)
    image = _frames(1, (30, 50))[0]
    out = preprocess_media([image, Video(clip_files["gif"], 3), Video(_frames())], config, 4)
    assert [m.shape for m in out] == [(1, 3, 24, 24), (3, 3, 24, 24), (4, 3, 24, 24)]
    assert np.array_equal(out[0], preprocess([image], config))
    picked = [_frames()[i] for i in sample_indices(FRAMES, 3)]
    assert np.array_equal(out[1], preprocess(picked, config))  # GIF: exact frames
    with pytest.raises(VideoError, match=r"media #1 .*: 5 frames asked, .* at most 4"):
        preprocess_media([image, Video(_frames(), 5)], config, 4)
    with pytest.raises(VideoError, match=r"max_frames 1.*num_frames=1"):
        preprocess_media([Video(_frames())], config, 1)
    one = preprocess_media([Video(_frames(), 1)], config, 1)[0]
    assert np.array_equal(one, preprocess([_frames()[4]], config))  # the middle frame


def test_encode_media_groups_by_frame_count_and_keeps_order() -> None:
    calls = []

    def encode(pixels: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(pixels.shape[:2])
        return {"x": pixels.reshape(len(pixels), -1).sum(-1)}

    rng = np.random.default_rng(0)
    media = [rng.standard_normal((f, 3, 2, 2)) for f in (1, 4, 1, 2, 4)]
    out = encode_media(encode, media)
    assert sorted(calls) == [(1, 2), (2, 1), (2, 4)]  # one run per distinct frame count
    assert np.allclose(out["x"], [m.sum() for m in media])
