"""The one way seqvision reads an image file: ``open_image(path)`` gives an 8-bit RGB PIL image or raises a
one-line ``DataError`` that names the file.

Every command (``predict``, ``validate``, the analysis commands, ImageFolder training data) reads through
here, because a file a user hands us can be anything: a named pipe that would block ``open()`` for ever, a
decompression bomb, a photo whose EXIF says "rotate me", a 16-bit scan or a float TIFF that a plain
``convert("RGB")`` would clip to black and white. What is done with each:

- Only regular files are opened (symbolic links to them too); a FIFO, directory or device is refused
  without being read, and the file is opened non-blocking so that a swap between the check and the open
  cannot hang either.
- Images with more than ``max_image_pixels()`` pixels are refused from the header, before any pixel is
  decoded (a header that lies about its size is refused the same way). The limit is Pillow's
  ``Image.MAX_IMAGE_PIXELS`` unless the environment variable ``SEQVISION_MAX_IMAGE_PIXELS`` sets another
  (``0`` or ``none``: no limit); the refusal says how to raise it. Empty images and strips longer than
  ``MAX_ASPECT``:1 are refused too: resizing their short side to a square model input would be huge.
- EXIF orientation is applied (``ImageOps.exif_transpose``): the image is seen the way a viewer shows it.
- 16-bit integer images (``I;16*``, and ``I`` with values in 0..65535, which is how Pillow opens 16-bit PNG,
  TIFF and PGM files) are scaled by 255/65535, the full-range convention torchvision's ``decode_image`` +
  ``to_dtype(scale=True)`` follows; ``I`` images with other values have no agreed scale and are refused.
- Float images (``F``, e.g. a 32-bit TIFF) with every value in [0, 1] are scaled by 255, the convention for
  float images; NaN, infinity or values outside [0, 1] have no agreed scale and are refused.
- Transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent index, premultiplied modes)
  is composited over white, as a viewer shows it, instead of exposing the colour that hides under
  transparent pixels; palette, CMYK, YCbCr, LAB, HSV and bilevel images are converted by Pillow.
- Truncated or corrupt files, and anything Pillow cannot decode, are refused by path.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

MAX_PIXELS_ENV = "SEQVISION_MAX_IMAGE_PIXELS"
# The largest input side (pixels) a command resizes images to: far above any recipe (224 .. 448), far below the
# sizes whose activations cannot fit in memory.
MAX_IMG_SIZE = 4096
CROP_PCT_RANGE = (0.25, 2.0)  # timm's models use 0.75 .. 1.0; far outside, the resize would be absurd
# Evaluation resizes the short side to the model's input size: a 1 x 60000 strip would become 256 x 15 M.
MAX_ASPECT = 100
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def display_path(path: str | os.PathLike | bytes) -> str:
    """``path`` as text that prints on one line under any locale: bytes that are not valid UTF-8 become
    ``\\xNN``, control characters (a newline in a file name) are escaped; other characters are kept."""
    text = os.fsdecode(path)
    # Undecodable bytes arrive as lone surrogates (surrogateescape), which no encoder can write.
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def max_image_pixels() -> int | None:
    """The pixel limit ``open_image`` applies: ``$SEQVISION_MAX_IMAGE_PIXELS`` if set (0 or "none": no
    limit), else Pillow's ``Image.MAX_IMAGE_PIXELS``; a DataError if the variable is not a count."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return Image.MAX_IMAGE_PIXELS
    if text.lower() == "none":
        return None
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise DataError(f"{MAX_PIXELS_ENV} must be a pixel count (or 0 for no limit), got {text!r}")
    return value or None


def open_image(path: str | os.PathLike, max_pixels: int | None | str = "default") -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image (EXIF orientation applied, see the module docstring).

    ``max_pixels``: refuse larger images (``"default"``: ``max_image_pixels()``; None: no limit).
    Raises ``DataError("<path>: ...")`` for a file that is missing, not a regular file, too large,
    truncated, corrupt or in a pixel format with no agreed 8-bit scaling.
    """
    name = display_path(path)
    limit = max_image_pixels() if max_pixels == "default" else max_pixels
    with _open_regular_file(path, name) as f:
        try:
            img = _decode(f, name, limit)
        except DataError:
            raise
        except UnidentifiedImageError:
            raise DataError(f"{name}: cannot read image (not in an image format Pillow knows, or corrupt)") from None
        except Exception as e:  # any decoder failure on an untrusted file is that file's problem
            raise DataError(f"{name}: cannot read image ({_reason(e)})") from None
    return to_rgb(img, name)


def to_rgb(img: Image.Image, source: str = "image") -> Image.Image:
    """A loaded PIL image of any mode as 8-bit RGB (16-bit and float scaled, transparency over white; an RGB
    image is returned as it is); ``DataError`` naming ``source`` when the values have no agreed 8-bit scale."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT or mode == "I":
        return _scaled(np.asarray(img), 65535, source, "16-bit").convert("RGB")
    if mode == "F":
        return _scaled(np.asarray(img), 1, source, "floating-point").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        mode, img = "RGBA", img.convert("RGBA")
    if mode in _ALPHA:
        rgba = img.convert("LA").convert("RGBA") if mode == "La" else img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert
        raise DataError(f"{source}: cannot convert a {mode} image to RGB ({_reason(e)})") from None


# -- helpers ---------------------------------------------------------------------------------------------------
class _open_regular_file:
    """Context manager: a binary file object for ``path`` if it is a regular file, else a DataError."""

    def __init__(self, path: str | os.PathLike, name: str):
        self.path, self.name = path, name
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise DataError(f"{self.name}: cannot read image ({_os_reason(e)})") from None
        _require_regular(st.st_mode, self.name)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            raise DataError(f"{self.name}: cannot read image ({_os_reason(e)})") from None
        try:
            _require_regular(os.fstat(fd).st_mode, self.name)  # it may have been swapped since the stat
        except BaseException:
            os.close(fd)
            raise
        self.file = os.fdopen(fd, "rb")
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _require_regular(mode: int, name: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = (
        "a directory" if stat.S_ISDIR(mode)
        else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a special file"
    )  # fmt: skip
    raise DataError(f"{name}: is {kind}, not a regular file; only regular files are read as images")


def _decode(f: IO[bytes], name: str, limit: int | None) -> Image.Image:
    """Open (header only), check the size, decode, apply EXIF orientation."""
    if limit is None or (Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS):
        # Pillow applies its own guard in open() and load(); a higher limit the user set must win over it.
        _raise_pillow_limit(limit)
    with warnings.catch_warnings():
        # Pillow warns between its limit and twice it, and raises above; the limit here is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(f)
        except Image.DecompressionBombError as e:
            m = re.search(r"\((\d+) pixels\)", str(e))
            pixels = int(m.group(1)) if m else None
            size = f"{pixels:,} pixels" if pixels else "too many pixels"
            raise DataError(f"{name}: image has {size}, over the limit of {limit:,}; {_how_to_raise(pixels)}") from None
        width, height = img.size
        if limit is not None and width * height > limit:
            raise DataError(
                f"{name}: image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
                f"(a guard against decompression bombs); {_how_to_raise(width * height)}"
            )
        if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
            raise DataError(
                f"{name}: image is {width}x{height}: empty or longer than {MAX_ASPECT}:1, which resizing its short "
                "side to the model's input would blow up; crop it first"
            )
        img.load()
    return ImageOps.exif_transpose(img)


def _raise_pillow_limit(limit: int | None) -> None:
    # Pillow's guard is a process-wide setting; it is only ever raised, and only to a limit the user set.
    Image.MAX_IMAGE_PIXELS = limit


def _how_to_raise(pixels: int | None) -> str:
    at_least = f"={pixels:,}".replace(",", "") if pixels else "=<pixels>"
    return f"to read it anyway, set {MAX_PIXELS_ENV}{at_least} (or 0 for no limit)"


def _scaled(a: np.ndarray, full_scale: int, source: str, kind: str) -> Image.Image:
    """An 8-bit grey image from pixel values whose full range is [0, full_scale] (65535 or 1)."""
    if a.size:
        lo, hi = a.min(), a.max()  # NaN propagates into both and fails the range test
        if not (0 <= lo and hi <= full_scale):
            rng = "0..65535" if full_scale > 1 else "[0, 1]"
            raise DataError(
                f"{source}: {kind} image with values from {lo:g} to {hi:g}, outside {rng}: there is no agreed way "
                "to scale it to 8 bits; save it as an 8-bit image"
            )
    if a.dtype.kind == "f":
        return Image.fromarray(np.rint(a.astype(np.float32) * 255.0).astype(np.uint8))
    return Image.fromarray(((a.astype(np.uint32) * 255 + full_scale // 2) // full_scale).astype(np.uint8))


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"{type(e).__name__}: {first}" if first and not isinstance(e, OSError) else (first or type(e).__name__)


def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__
