"""Image URLs of a request -> decoded images (and their bytes), or a 400 naming the field.

Accepted: `data:image/<type>;base64,<data>` and, only when the server was given an allowed
folder, `file://` URLs whose resolved path (symlinks followed) lies inside it. Nothing is ever
fetched from the network. Decoding uses `runtime.images.load_image`, the pipeline's own loader:
the decoded image is what the pipeline gets (decoded once), the bytes are what the
demonstrations' affinity key hashes.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from runtime.images import ImageError, load_image

from .protocol import APIError


@dataclass(frozen=True)
class MediaImage:
    data: bytes  # as sent (encoded)
    image: Image.Image  # decoded by runtime.images.load_image


def load_url(url: object, param: str, allowed_dir: Path | None) -> MediaImage:
    """The image behind one URL, decoded (400 naming `param` otherwise)."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"'{param}' must be a non-empty string URL", param=param)
    if url.startswith("data:"):
        data = _data_url(url, param)
    elif url.startswith("file:"):
        data = _file_url(url, param, allowed_dir)
    elif url.split(":", 1)[0].lower() in ("http", "https", "ftp"):
        raise APIError(
            400,
            f"'{param}': remote image URLs are not fetched; send the image as a data URL "
            "(data:image/png;base64,...)",
            param=param,
        )
    else:
        raise APIError(400, f"'{param}': expected a data: or file:// URL", param=param)
    try:
        return MediaImage(data, load_image(data, name=param))
    except ImageError as e:
        raise APIError(400, f"image does not decode: {e}", param=param) from None


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


def _file_url(url: str, param: str, allowed_dir: Path | None) -> bytes:
    if allowed_dir is None:
        raise APIError(
            400,
            f"'{param}': file:// URLs are disabled (start the server with --allowed-media-dir)",
            param=param,
        )
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"'{param}': file URL host must be empty or localhost", param=param)
    root = allowed_dir.resolve()
    path = Path(unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise APIError(400, f"'{param}': {path} is outside the allowed media folder", param=param)
    try:
        return path.read_bytes()
    except OSError as e:
        raise APIError(400, f"'{param}': cannot read {path} ({e.strerror})", param=param) from None
