"""decode_image: every odd or broken input either decodes to an 8-bit image or fails with a reason."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import OUTPUT_MODES, REASONS, DecodedImage, ImageDecodeError, decode_image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another: shows where a rotation moved things."""
    img = Image.new("RGB", (width, height), left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds almost no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    return info.value.reason


def color_at(decoded: DecodedImage, xy: tuple[int, int]) -> tuple[int, ...]:
    return decoded.image.convert("RGB").getpixel(xy)


def close_to(a, b, tolerance: int = 40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


# --- failures, each with its reason ------------------------------------------------------------


def test_error_string_is_reason_then_message():
    err = ImageDecodeError("empty", "0 bytes")
    assert isinstance(err, ValueError)
    assert (err.reason, err.message, str(err)) == ("empty", "0 bytes", "empty: 0 bytes")


def test_zero_bytes_is_empty():
    assert reason_of(b"") == "empty"


def test_html_page_is_not_an_image():
    assert reason_of(b"<!doctype html><html><body>403 Forbidden</body></html>") == "not_an_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_cut_off_file_is_truncated(fmt, keep):
    data = encode(noise(300, 200), fmt)
    assert reason_of(data[: int(len(data) * keep)]) == "truncated"


def test_jpeg_cut_inside_its_header_is_truncated():
    data = encode(noise(300, 200), "JPEG")
    assert reason_of(data[:40]) == "truncated"


def test_format_pil_knows_but_we_do_not_accept_is_unsupported():
    assert reason_of(encode(Image.new("RGB", (16, 16)), "EPS")) == "unsupported_format"


def test_avif_decodes_and_a_cut_one_is_truncated():
    data = encode(halves(40, 30), "AVIF")
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (40, 30) and close_to(color_at(decoded, (5, 15)), RED)
    assert reason_of(data[:100]) == "truncated" and reason_of(data[: len(data) - 20]) == "truncated"


def heif_header(major: bytes, *compatible: bytes) -> bytes:
    """The leading `ftyp` box of an ISO media file, then bytes PIL cannot read."""
    body = major + b"\0\0\0\0" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\0" * 200


def test_heif_without_a_plugin_is_an_unsupported_format_not_a_non_image():
    with pytest.raises(ImageDecodeError, match="unsupported_format: HEIF image \\(brand heic\\)"):
        decode_image(heif_header(b"heic", b"mif1", b"heic"))
    # A damaged AVIF whose major brand is the generic mif1 is still an AVIF.
    assert reason_of(heif_header(b"mif1", b"mif1", b"avif")) == "truncated"


def test_declared_size_over_max_pixels_is_refused_before_decoding():
    # 60000 x 60000 RGB would need 10 GiB; the file is a few dozen bytes.
    assert reason_of(png_header_only(60_000, 60_000)) == "decompression_bomb"


def test_declared_size_over_pils_own_hard_limit_is_a_bomb_too():
    assert reason_of(png_header_only(60_000, 60_000), max_pixels=10**12) == "decompression_bomb"


def test_real_image_over_a_low_max_pixels_is_a_bomb():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert reason_of(data, max_pixels=9_999) == "decompression_bomb"
    assert decode_image(data, max_pixels=10_000).width == 100


def test_side_shorter_than_min_side_is_too_small():
    data = encode(Image.new("RGB", (1, 1)), "GIF")
    assert reason_of(data, min_side=2) == "too_small"
    assert decode_image(data).image.size == (1, 1)


def test_garbage_after_a_png_signature_is_an_error_not_a_crash():
    rng = random.Random(0)
    data = b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(500))
    assert reason_of(data) in REASONS


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_random_corruption_never_raises_anything_but_image_decode_error(fmt):
    original = bytearray(encode(noise(64, 48), fmt))
    rng = random.Random(fmt)
    for _ in range(40):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decoded = decode_image(bytes(data))
        except ImageDecodeError as err:
            assert err.reason in REASONS
        else:
            assert decoded.image.mode in OUTPUT_MODES


# --- odd but valid images, each decoded to an 8-bit mode ----------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_plain_rgb_decodes_with_its_size(fmt):
    decoded = decode_image(encode(halves(40, 20), fmt))
    assert (decoded.image.mode, decoded.width, decoded.height) == ("RGB", 40, 20)
    assert close_to(color_at(decoded, (2, 10)), RED) and close_to(color_at(decoded, (37, 10)), BLUE)


def test_grayscale_stays_l():
    decoded = decode_image(encode(Image.new("L", (30, 10), 77), "PNG"))
    assert decoded.image.mode == "L" and decoded.image.getpixel((0, 0)) == 77


def test_palette_without_transparency_stays_p():
    img = halves(20, 10).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    decoded = decode_image(encode(img, "PNG"))
    assert decoded.image.mode == "P"
    assert color_at(decoded, (1, 1)) == RED


def test_palette_with_transparency_keeps_its_transparency():
    img = halves(20, 10).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    transparent_index = img.getpixel((0, 0))
    decoded = decode_image(encode(img, "PNG", transparency=transparent_index))
    assert decoded.image.mode == "P"
    alpha = decoded.image.convert("RGBA").getchannel("A")
    assert alpha.getpixel((1, 1)) == 0 and alpha.getpixel((18, 1)) == 255


def test_rgba_keeps_alpha():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    decoded = decode_image(encode(img, "PNG"))
    assert decoded.image.mode == "RGBA" and decoded.image.getpixel((5, 5))[3] == 0


def test_la_keeps_alpha():
    img = Image.new("LA", (10, 10), (200, 100))
    decoded = decode_image(encode(img, "PNG"))
    assert decoded.image.mode == "LA" and decoded.image.getpixel((5, 5)) == (200, 100)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # full magenta + yellow = red
    decoded = decode_image(encode(img, "JPEG", quality=95))
    assert decoded.image.mode == "RGB"
    assert close_to(color_at(decoded, (8, 8)), RED)


def test_one_bit_becomes_l_black_and_white():
    img = Image.new("1", (16, 8), 0)
    img.paste(1, (8, 0, 16, 8))
    decoded = decode_image(encode(img, "PNG"))
    assert decoded.image.mode == "L"
    assert (decoded.image.getpixel((0, 0)), decoded.image.getpixel((15, 0))) == (0, 255)


def gradient16(width: int = 256) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (4, 1))


def test_16bit_png_gradient_is_scaled_to_the_full_8bit_range_not_clipped():
    decoded = decode_image(encode(Image.fromarray(gradient16()), "PNG"))
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "L"
    assert (pixels.min(), pixels.max()) == (0, 255)
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)  # still a gradient: monotonic
    assert abs(int(pixels[0, 128]) - 128) <= 2  # mid-grey stays mid-grey


def test_16bit_big_endian_tiff_is_scaled_too():
    img = Image.frombytes("I;16B", (256, 4), gradient16().astype(">u2").tobytes())
    decoded = decode_image(encode(img, "TIFF"))
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "L" and (pixels.min(), pixels.max()) == (0, 255)


def test_32bit_integer_and_float_images_are_stretched_to_8bit():
    wide = Image.fromarray(np.tile(np.arange(-1000, 1000, 10, dtype=np.int32), (4, 1)), "I")
    floats = Image.fromarray(np.tile(np.linspace(0.0, 1.0, 50, dtype=np.float32), (4, 1)), "F")
    for img in (wide, floats):
        decoded = decode_image(encode(img, "TIFF"))
        pixels = np.asarray(decoded.image)
        assert decoded.image.mode == "L" and (pixels.min(), pixels.max()) == (0, 255)


def exif_rotated_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_6_is_applied_and_reported_in_the_size():
    # Orientation 6: the camera was turned 90 degrees clockwise; the left edge becomes the top.
    decoded = decode_image(exif_rotated_jpeg(halves(40, 20), 6))
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.image.size == (20, 40)
    assert close_to(color_at(decoded, (10, 2)), RED) and close_to(color_at(decoded, (10, 37)), BLUE)


def test_exif_orientation_3_turns_upside_down_without_swapping_sides():
    decoded = decode_image(exif_rotated_jpeg(halves(40, 20), 3))
    assert decoded.image.size == (40, 20)
    assert close_to(color_at(decoded, (2, 10)), BLUE) and close_to(color_at(decoded, (37, 10)), RED)


def test_draft_decodes_a_jpeg_smaller_but_reports_the_original_size():
    decoded = decode_image(encode(noise(800, 600), "JPEG"), draft_size=100)
    assert (decoded.width, decoded.height) == (800, 600)
    assert decoded.image.size == (200, 150)  # 1/4 scale: the largest that keeps both sides >= 100
    assert min(decoded.image.size) >= 100


def test_draft_with_exif_rotation_reports_the_rotated_original_size():
    decoded = decode_image(exif_rotated_jpeg(halves(800, 400), 6), draft_size=100)
    assert (decoded.width, decoded.height) == (400, 800)
    assert decoded.image.size == (100, 200)
    assert close_to(color_at(decoded, (50, 5)), RED)


def test_draft_is_ignored_for_other_formats():
    decoded = decode_image(encode(noise(400, 300), "PNG"), draft_size=100)
    assert decoded.image.size == (400, 300)


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])  # PNG with save_all is APNG
def test_animated_image_gives_its_first_frame(fmt):
    data = animation(fmt)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = decode_image(data)
    assert decoded.image.mode in OUTPUT_MODES
    assert (decoded.width, decoded.height) == (16, 16)
    assert close_to(color_at(decoded, (8, 8)), RED, tolerance=10)
