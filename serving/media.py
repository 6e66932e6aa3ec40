"""Image URLs of a request -> decoded images (and their bytes), or a 400 naming the field.

Accepted: `data:image/<type>;base64,<data>` and, only when the server was given an allowed
folder, `file://` URLs whose resolved path (symlinks followed) lies inside it and is a regular
file of at most `MediaLimits.max_file_bytes` (the body limit: a file URL carries no more than
a data URL could). Nothing is ever fetched from the network. Decoding uses
`runtime.images.load_image`, the pipeline's own loader: the decoded image is what the pipeline
gets (decoded once), the bytes are what the demonstrations' affinity key hashes.

A request's images together may decode to at most `MediaLimits.max_request_pixels`: each
image's size is read from its header and charged before it is decoded, so a request of small
files that decode to huge images (a 37 KB 1-bit PNG of 13000 x 13000) is refused before it
takes memory. Messages name only what the client sent (the field, its URL), never a resolved
server path or a decoder's own text (details go to the log).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from runtime.files import read_regular
from runtime.images import ImageError, load_image

from .protocol import APIError

log = logging.getLogger("serving.media")


@dataclass(frozen=True)
class MediaImage:
    data: bytes  # as sent (encoded)
    image: Image.Image  # decoded by runtime.images.load_image


@dataclass(frozen=True)
class MediaLimits:
    """What a request's image URLs may take (serving.app.AppSettings fills it)."""

    allowed_dir: Path | None = None  # file:// URLs allowed under it; None: refused
    max_file_bytes: int = 16 << 20  # largest file a file:// URL may name
    max_request_pixels: int = 64 << 20  # decoded pixels of all images of one request


class MediaReader:
    """Loads the image URLs of one request against its pixel budget (`load`)."""

    def __init__(self, limits: MediaLimits) -> None:
        self.limits = limits
        self.pixels_left = limits.max_request_pixels

    def load(self, url: object, param: str) -> MediaImage:
        """The image behind one URL, decoded (400 naming `param` otherwise)."""
        if not isinstance(url, str) or not url:
            raise APIError(400, f"'{param}' must be a non-empty string URL", param=param)
        if url.startswith("data:"):
            data = _data_url(url, param)
        elif url.startswith("file:"):
            data = _file_url(url, param, self.limits)
        elif url.split(":", 1)[0].lower() in ("http", "https", "ftp"):
            raise APIError(
                400,
                f"'{param}': remote image URLs are not fetched; send the image as a data URL "
                "(data:image/png;base64,...)",
                param=param,
            )
        else:
            raise APIError(400, f"'{param}': expected a data: or file:// URL", param=param)
        size = _header_size(data, param)
        if size is not None:
            self._charge(size, param)
        try:
            image = load_image(data, name=param)
        except ImageError as e:
            raise APIError(400, _decode_message(e, param), param=param) from None
        if size is None:
            self._charge(image.size, param)
        return MediaImage(data, image)

    def _charge(self, size: tuple[int, int], param: str) -> None:
        pixels = size[0] * size[1]
        if pixels > self.pixels_left:
            total = self.limits.max_request_pixels / 1e6
            raise APIError(
                400,
                f"'{param}': a {size[0]}x{size[1]} image exceeds what is left of this "
                f"request's decoded-image budget ({total:g} megapixels for all its images); "
                "send smaller images (the model sees each at its preprocessing size)",
                param=param,
            )
        self.pixels_left -= pixels


def load_url(url: object, param: str, limits: MediaLimits) -> MediaImage:
    """One image URL alone (a fresh pixel budget); see MediaReader."""
    return MediaReader(limits).load(url, param)


def _header_size(data: bytes, param: str) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding its pixels; None when Pillow
    cannot read the header (load_image then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only; decoding is load_image's
            return im.size
    except Image.DecompressionBombError:
        raise APIError(400, f"'{param}': the image is too large to decode", param=param) from None
    except Exception:
        return None


def _decode_message(e: ImageError, param: str) -> str:
    """The client's message for an image that does not decode. runtime.images words its own
    findings from the input's name (`param` here) and fixed text; when it wraps a decoder's
    exception (`__cause__`), that text may hold server paths or a command line: it is logged,
    not sent."""
    if e.__cause__ is None:
        return f"image does not decode: {e}"
    log.warning("%s", e)
    return (
        f"image does not decode: '{param}': truncated, corrupt or an unsupported format "
        "(details in the server log)"
    )


def _data_url(url: str, param: str) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise APIError(400, f"'{param}': malformed data URL (no ',')", param=param)
    parts = head.split(";")
    if parts[0] and not parts[0].lower().startswith("image/"):
        raise APIError(400, f"'{param}': data URL type {parts[0]!r} is not an image", param=param)
    if "base64" not in (p.lower() for p in parts[1:]):
        raise APIError(400, f"'{param}': data URL must be base64 (';base64,')", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        message = f"'{param}': data URL payload is not valid base64"
        raise APIError(400, message, param=param) from None
    if not data:
        raise APIError(400, f"'{param}': data URL is empty", param=param)
    return data


def _file_url(url: str, param: str, limits: MediaLimits) -> bytes:
    if limits.allowed_dir is None:
        raise APIError(
            400,
            f"'{param}': file:// URLs are disabled (start the server with --allowed-media-dir)",
            param=param,
        )
    try:
        parsed = urlparse(url)
    except ValueError:
        raise APIError(400, f"'{param}': malformed file URL", param=param) from None
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"'{param}': file URL host must be empty or localhost", param=param)
    name = unquote(parsed.path)
    if "\x00" in name:
        raise APIError(400, f"'{param}': the file URL contains a NUL character", param=param)
    root = limits.allowed_dir.resolve()
    try:
        path = Path(name).resolve()
    except (OSError, ValueError, RuntimeError):  # a loop of links, an unencodable name
        raise APIError(400, f"'{param}': cannot resolve {url!r}", param=param) from None
    if not path.is_relative_to(root):
        raise APIError(400, f"'{param}': {url!r} is outside the allowed media folder", param=param)
    return _read_regular(path, url, param, limits.max_file_bytes)


def _read_regular(path: Path, url: str, param: str, max_bytes: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes` (runtime.files: a
    FIFO or device is refused on the opened descriptor, never read)."""
    try:
        return read_regular(path, max_bytes)
    except OSError as e:  # strerror says what it is, without the path
        why = e.strerror or type(e).__name__
        raise APIError(400, f"'{param}': cannot read {url!r} ({why})", param=param) from None
