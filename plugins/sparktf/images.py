"""Defensive image decoding: bytes in, a fixed-shape uint8 array or a reason out.

Content decides the format (never the file extension), Pillow's decompression-bomb guard is
enforced, and every failure becomes an :class:`ImageRejected` with a short machine-readable
reason, so callers can set the image aside and go on with the rest.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np

# Formats we accept; anything else is rejected before Pillow tries its other plugins.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Default cap on decoded pixels (width * height): far above any real photo we score.
DEFAULT_MAX_PIXELS = 40_000_000
# How an image of another size becomes the model's input, recorded per model version as
# ``resize_policy`` (a version without it gets ``resize``, what the digit models were trained with):
#   resize       plain bilinear resize to the target (aspect ratio not kept); transparent pixels
#                composited onto black, matching MNIST's white-on-black digits.
#   center_crop  photos: aspect-preserving resize of the shorter side to the target, then the
#                centre is cut out (nothing squeezed, as ImageNet networks were trained and
#                evaluated); transparent pixels composited onto white, the usual page background
#                of cut-out product shots and logos.
RESIZE_POLICIES = ("resize", "center_crop")
DEFAULT_RESIZE_POLICY = "resize"
_ALPHA_BACKGROUND = {"resize": 0, "center_crop": 255}
# Pillow's bomb guard reads a module global (and warns through the process-wide warnings
# filters): the fetch threads of one task open images concurrently, so the limit is set, used
# and restored under this lock, around the header read that Pillow checks it in.
_PILLOW_LIMIT_LOCK = threading.Lock()


class ImageRejected(Exception):
    """An image that cannot be used. ``reason`` is one of a small set of codes."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(
    data: bytes,
    *,
    height: int = 28,
    width: int = 28,
    channels: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize_policy: str = DEFAULT_RESIZE_POLICY,
) -> np.ndarray:
    """Decode image bytes into a ``(height, width, channels)`` uint8 array.

    Any Pillow mode is accepted (1, L, P, RGB, RGBA, LA, I;16, I, F, CMYK, ...). Images of another
    size are brought to the target with bilinear filtering as ``resize_policy`` says (see
    :data:`RESIZE_POLICIES`): ``resize`` (the default) stretches and composites transparent pixels
    onto black (digits); ``center_crop`` keeps the aspect ratio, cuts out the centre and
    composites onto white (photos). The EXIF orientation is applied first (phone photos are
    stored sideways with an orientation tag). Multi-frame files (animated GIF, WebP, multi-page
    TIFF) use their first frame.

    Memory stays bounded by the decoded image itself: JPEGs are decoded at a reduced scale when
    the target is much smaller (``draft``), large images are reduced by an integer factor before
    any conversion, and 16/32-bit images are brought to the target in their own depth before
    being scaled to 8 bits (never a full-size float copy).

    Raises:
        ImageRejected: with reason ``empty``, ``not_an_image``, ``too_large``, ``truncated`` or
            ``corrupt``.
        ValueError: for an unknown ``resize_policy`` (a model's metadata, not the image, is wrong).
    """
    from PIL import Image, UnidentifiedImageError

    if resize_policy not in RESIZE_POLICIES:
        raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {resize_policy!r}")
    if not data:
        raise ImageRejected("empty", "zero bytes")
    try:
        return _open_and_convert(data, height=height, width=width, channels=channels, max_pixels=max_pixels, resize_policy=resize_policy)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("too_large", str(err)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "content is not a supported image format") from None
    except (OSError, SyntaxError, EOFError) as err:
        message = str(err)
        reason = "truncated" if "truncat" in message.lower() else "corrupt"
        raise ImageRejected(reason, message) from None
    except (ValueError, TypeError, IndexError, MemoryError) as err:
        # Pillow raises plain ValueErrors from several decoders (and its bomb guard).
        raise ImageRejected("corrupt", f"{type(err).__name__}: {err}") from None


def _open_limited(data: bytes, max_pixels: int):
    """``Image.open`` with the allowed formats and Pillow's bomb guard at ``max_pixels`` (its
    warning between ``max_pixels`` and twice that an error too), whatever other threads do."""
    from PIL import Image

    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit


def _open_and_convert(data: bytes, *, height: int, width: int, channels: int, max_pixels: int, resize_policy: str) -> np.ndarray:
    """Open ``data`` with the allowed formats only, refuse too many pixels before decoding, decode
    (a JPEG at a reduced scale when the target is much smaller) and bring it to the target."""
    with _open_limited(data, max_pixels) as img:
        if img.width * img.height > max_pixels:
            raise ImageRejected("too_large", f"{img.width}x{img.height} pixels")
        if img.format == "JPEG":
            # Let the JPEG decoder scale down by 1/2..1/8 while keeping at least twice the target
            # on each side (square request: orientation may swap the sides).
            side = 2 * max(height, width)
            img.draft(img.mode, (side, side))
        img.load()
        return _to_array(img, height=height, width=width, channels=channels, resize_policy=resize_policy)


# Modes Image.reduce supports (P would average palette indices, 1 and I;16 are refused).
_REDUCIBLE_MODES = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F"}


def _to_array(img, *, height: int, width: int, channels: int, resize_policy: str = DEFAULT_RESIZE_POLICY) -> np.ndarray:
    from PIL import Image, ImageOps

    ImageOps.exif_transpose(img, in_place=True)  # before any resize; no copy when already upright
    factor = min(img.width // (2 * width), img.height // (2 * height))
    if factor >= 2 and img.mode in _REDUCIBLE_MODES:
        # A box reduction to at least twice the target on each side first: the conversions below
        # then work on a small image, and the final resample still has the detail it needs.
        img = img.reduce(factor)
    img = _to_8bit(img, height=height, width=width, resize_policy=resize_policy)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        shade = _ALPHA_BACKGROUND[resize_policy]
        background = Image.new("RGBA", rgba.size, (shade, shade, shade, 255))
        img = Image.alpha_composite(background, rgba)
    target_mode = "L" if channels == 1 else "RGB"
    img = img.convert(target_mode)
    img = _fit(img, width=width, height=height, resize_policy=resize_policy)
    array = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        array = array[:, :, None]
    return array


def _fit(img, *, width: int, height: int, resize_policy: str):
    """The image at the target size, as the policy says (bilinear, antialiased when shrinking)."""
    from PIL import Image

    if img.size == (width, height):
        return img
    if resize_policy == "center_crop":
        # Scale so that the image covers the target, then keep the centre: one resample of the
        # centre box (Pillow crops and resizes in a single pass, no intermediate image).
        scale = max(width / img.width, height / img.height)
        box_width, box_height = width / scale, height / scale
        left, top = (img.width - box_width) / 2, (img.height - box_height) / 2
        return img.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + box_width, top + box_height))
    return img.resize((width, height), Image.Resampling.BILINEAR)


def _to_8bit(img, *, height: int, width: int, resize_policy: str = DEFAULT_RESIZE_POLICY):
    """Stretch 16/32-bit integer and float images to 8 bits over their full range (Pillow's
    convert clips instead).

    The range comes from the whole image (computed by Pillow, no copy); the image is brought to
    the target (as the policy says) in its own depth first, so only a target-sized array is
    ever converted to float. A 6000 x 6000 16-bit PNG costs its 72 MB decoded buffer, not
    gigabytes of float64 copies.
    """
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        low, high = (float(v) for v in img.getextrema())
        img = _fit(img, width=width, height=height, resize_policy=resize_policy)
        values = np.asarray(img, dtype=np.float64)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8), mode="L")
    return img


def encode_png(array: np.ndarray) -> bytes:
    """Encode a ``(h, w)`` or ``(h, w, c)`` uint8 array as PNG bytes."""
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
