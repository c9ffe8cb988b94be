"""Step 2 of the data path: turn raw image bytes into a PIL image, or say exactly why not.

Web-scraped data holds every kind of damage: empty files, HTML error pages saved as .jpg,
half-downloaded JPEGs, 16-bit PNGs, CMYK scans, camera photos stored sideways with an EXIF
orientation flag, 50 000 x 50 000 "images" meant to exhaust memory. `decode_image` either returns
an 8-bit image the next step (`convert_to_rgb`) can use, or raises `ImageDecodeError` with one
reason code so that every failed sample is counted under a reason and the batch goes on.

Truncation is detected by fully loading the image; this relies on PIL's global
`ImageFile.LOAD_TRUNCATED_IMAGES` staying False (its default), which this module never changes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = (
    "empty",
    "truncated",
    "not_an_image",
    "unsupported_format",
    "decompression_bomb",
    "too_small",
    "decode_failed",
)

# Formats PIL can open that we trust to decode the same way everywhere. Others that PIL
# recognises (EPS needs Ghostscript, PDF/ICNS/XPM/... are not photos) are refused by name.
SUPPORTED_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "AVIF", "HEIF"}
)

# Modes a later `convert_to_rgb` accepts as they are (alpha and palettes are kept on purpose:
# that step composites transparency on white).
OUTPUT_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P"})

# Orientations 5-8 rotate by 90 or 270 degrees, so width and height swap.
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112

# Leading bytes of the formats we accept: bytes that start like an image but cannot be opened
# are damaged images, not "not an image".
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)


# ISO media files hold AVIF (AV1) and HEIF (HEVC) images: their `ftyp` box's major brand says which.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})


class ImageDecodeError(ValueError):
    """Why some bytes did not give an image: `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class DecodedImage:
    """An 8-bit image (mode in `OUTPUT_MODES`) with its original size, after EXIF orientation.

    With `draft_size` a JPEG's `image` can be smaller than `width` x `height`.
    """

    image: Image.Image
    width: int
    height: int


def decode_image(
    data: bytes,
    max_pixels: int = 100_000_000,
    draft_size: int | None = None,
    min_side: int = 1,
) -> DecodedImage:
    """Decode one image from bytes; raise `ImageDecodeError` for anything unusable.

    The size is checked against `max_pixels` from the header, before any pixel is decoded.
    `draft_size` lets a JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) while staying at
    least `draft_size` on both sides: much faster when the model wants 224 pixels.
    Images with a side shorter than `min_side` (tracking pixels) are refused as "too_small".
    Animated images give their first frame.
    """
    if not data:
        raise ImageDecodeError("empty", "0 bytes")
    img = _open(data)

    if img.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError("unsupported_format", f"{img.format} images are not supported")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "decompression_bomb", f"{width}x{height} is over the limit of {max_pixels} pixels"
        )
    if min(width, height) < min_side:
        raise ImageDecodeError("too_small", f"{width}x{height} has a side under {min_side} pixels")

    if draft_size and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (draft_size, draft_size))
    _load(img)

    orientation = _orientation(img)
    if orientation in _SWAPS_AXES:
        width, height = height, width
    if orientation not in (None, 1):
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as err:  # noqa: BLE001
            raise ImageDecodeError("decode_failed", f"cannot apply EXIF orientation {orientation}: {err}") from None
    return DecodedImage(_to_8bit(img), width, height)


def _open(data: bytes) -> Image.Image:
    """Read the header only: format, mode and declared size."""
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's own global limit fired before ours could (2x Image.MAX_IMAGE_PIXELS, or any
        # size over it where warnings are turned into errors).
        raise ImageDecodeError("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        if (brand := _heif_brand(data)) is not None:
            raise ImageDecodeError(
                "unsupported_format", f"HEIF image (brand {brand}): PIL has no HEIF plugin here (pillow-heif)"
            ) from None
        if _looks_like_image(data):
            raise ImageDecodeError("truncated", f"image header cut short or damaged ({len(data)} bytes)") from None
        raise ImageDecodeError("not_an_image", f"unrecognised data starting {data[:16]!r}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _load_error(err, data) from None


def _load(img: Image.Image) -> None:
    """Decode all pixels (of the first frame): the only way to find a truncated file."""
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("decompression_bomb", str(err)) from None
    except Exception as err:  # noqa: BLE001  (plugins raise OSError, SyntaxError, struct.error, ...)
        raise _load_error(err, None) from None


def _load_error(err: Exception, data: bytes | None) -> ImageDecodeError:
    text = str(err) or type(err).__name__
    lowered = text.lower()
    if isinstance(err, EOFError) or "truncat" in lowered or _riff_cut_short(data):
        return ImageDecodeError("truncated", text)
    if "decoder" in lowered and "not available" in lowered:
        return ImageDecodeError("unsupported_format", text)
    if "too large" in lowered:  # e.g. PNG text chunks that decompress to gigabytes
        return ImageDecodeError("decompression_bomb", text)
    return ImageDecodeError("decode_failed", f"{type(err).__name__}: {text}")


def _looks_like_image(data: bytes) -> bool:
    return (
        data.startswith(_SIGNATURES)
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        or bool(_ftyp_brands(data) & _AVIF_BRANDS)
    )


def _heif_brand(data: bytes) -> str | None:
    """The brand of a HEIF/HEIC file, which PIL opens only with a plugin: without one it is a
    format we cannot read, not "not an image". None for anything else, AVIF included."""
    brands = _ftyp_brands(data)
    if not brands & _HEIF_BRANDS or brands & _AVIF_BRANDS:
        return None
    return data[8:12].decode("ascii", "replace")


def _ftyp_brands(data: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO media file's leading `ftyp` box (AVIF and HEIF
    images are such files); empty for other data."""
    if data[4:8] != b"ftyp":
        return set()
    size = min(int.from_bytes(data[:4], "big"), len(data), 256)
    return {data[8:12]} | {data[i : i + 4] for i in range(16, size - 3, 4)}


def _riff_cut_short(data: bytes | None) -> bool:
    """WebP reports a cut file only as "could not create decoder": compare the declared size."""
    if data is None or data[:4] != b"RIFF" or len(data) < 8:
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001  (broken EXIF must not cost us an otherwise good image)
        return None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring any decoded mode to one of `OUTPUT_MODES`, scaling wide integers instead of clipping."""
    mode = img.mode
    if mode in OUTPUT_MODES:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode))  # 2-D uint8 gives "L"
    if mode == "1":
        return img.convert("L")
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    try:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageDecodeError("decode_failed", f"cannot convert mode {mode} to RGB: {err}") from None


def _scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit integers map 0..65535 to 0..255. Other ranges ("I" from 32-bit TIFFs, float
    images) are stretched from their own minimum to maximum, since they have no fixed white."""
    pixels = pixels.astype(np.float64)
    if mode == "F" and pixels.min() >= 0.0 and pixels.max() <= 1.0:
        scaled = pixels * 255.0
    elif mode != "F" and pixels.min() >= 0 and pixels.max() <= 65535:
        scaled = pixels / 257.0
    else:
        low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)
