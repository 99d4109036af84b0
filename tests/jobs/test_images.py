"""decode_image: every Pillow mode and format decodes to the model's input spec; bad bytes get a reason."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
from PIL import Image

from sparktf.images import ImageRejected, decode_image


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digit(mnist_subset) -> np.ndarray:
    return mnist_subset[0][0]  # a real 28x28 uint8 digit


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "I;16", "I", "F", "LA", "CMYK"])
def test_every_mode_decodes_to_28x28x1(digit, mode):
    base = Image.fromarray(digit)
    if mode == "I;16":
        img = Image.fromarray(digit.astype(np.uint16) * 257)  # 16-bit with the full range
    elif mode in ("I", "F"):
        img = Image.fromarray(digit.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    else:
        img = base.convert(mode)
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK", "LA") else "PNG"
    array = decode_image(encode(img, fmt))
    assert array.shape == (28, 28, 1)
    assert array.dtype == np.uint8
    if mode in ("L", "RGB", "RGBA", "P", "I;16", "I", "F", "LA"):
        # Lossless modes keep the digit (within rounding).
        assert np.abs(array[:, :, 0].astype(int) - digit.astype(int)).max() <= 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
def test_formats_and_sizes(digit, fmt):
    big = Image.fromarray(digit).resize((112, 84))
    array = decode_image(encode(big.convert("RGB") if fmt == "JPEG" else big, fmt))
    assert array.shape == (28, 28, 1)
    assert np.corrcoef(array.ravel(), digit.ravel())[0, 1] > 0.8  # still the same digit


def test_rgb_output_and_transparency_on_black(digit):
    rgba = Image.fromarray(np.stack([digit] * 3 + [digit], axis=2), mode="RGBA")
    array = decode_image(encode(rgba, "PNG"), channels=3)
    assert array.shape == (28, 28, 3)
    assert array[digit == 0].max() == 0  # transparent background composited onto black


def test_content_decides_not_extension(bucket, digit):
    # A PNG stored as "x.jpg" goes through the real fetch + decode path by its key and is decoded
    # as the PNG it is (the decoder is never given the name).
    from sparktf import fetch, storage

    key = "content-decides/photo.jpg"
    storage.write_bytes(storage.object_uri(bucket, key), encode(Image.fromarray(digit), "PNG"))
    [(got_key, array, reason, detail)] = list(fetch.fetch_decoded(bucket, [key], height=28, width=28, channels=1, max_pixels=1_000_000))
    assert (got_key, reason, detail) == (key, None, None)
    assert np.array_equal(array[:, :, 0], digit)
    assert "name" not in inspect.signature(decode_image).parameters


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"hello, I am plain text\n", "not_an_image"),
        (b"<html><body>404 Not Found</body></html>", "not_an_image"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not_an_image"),
    ],
)
def test_garbage_is_rejected_with_reason(payload, reason):
    with pytest.raises(ImageRejected) as err:
        decode_image(payload)
    assert err.value.reason == reason


def test_truncated_png_is_rejected(digit):
    data = encode(Image.fromarray(digit), "PNG")
    with pytest.raises(ImageRejected) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason in ("truncated", "corrupt")


def test_decompression_bomb_is_rejected():
    bomb = encode(Image.new("L", (6000, 6000)), "PNG")  # 36 Mpx of zeros: a few KB compressed
    assert len(bomb) < 100_000
    with pytest.raises(ImageRejected) as err:
        decode_image(bomb, max_pixels=1_000_000)
    assert err.value.reason == "too_large"


def test_a_bomb_is_judged_by_the_callers_limit_while_another_thread_decodes(digit, monkeypatch):
    """Pillow's limit is a module global, and a task's fetch threads decode at once: a thread
    that finishes a digit while another opens a bomb must not put Pillow's default back under it
    (the bomb's reason would then name Pillow's limit, not the job's)."""
    import threading

    from PIL import Image as pillow

    from sparktf_dev.testing import png_bomb

    digit_png, bomb = encode(pillow.fromarray(digit), "PNG"), png_bomb(width=20_000, height=20_000)
    digit_inside, bomb_inside, digit_done = threading.Event(), threading.Event(), threading.Event()
    real_open = pillow.open

    def open_in_lockstep(fp, *args, **kwargs):
        if fp.getvalue() == bomb:
            bomb_inside.set()
            digit_done.wait(timeout=5)
        else:
            digit_inside.set()
            bomb_inside.wait(timeout=1.0)  # unguarded, the bomb's decode is opening by now
        return real_open(fp, *args, **kwargs)

    def decode_the_digit():
        decode_image(digit_png)
        digit_done.set()

    monkeypatch.setattr(pillow, "open", open_in_lockstep)
    first = threading.Thread(target=decode_the_digit)
    first.start()
    assert digit_inside.wait(timeout=5)
    with pytest.raises(ImageRejected) as err:
        decode_image(bomb, max_pixels=100_000_000)
    first.join(timeout=5)
    assert digit_done.is_set()
    assert err.value.reason == "too_large"
    assert "exceeds limit of 200000000 pixels" in err.value.detail  # Pillow's error is at twice the limit


def test_unsupported_format_is_rejected(digit):
    with pytest.raises(ImageRejected) as err:
        decode_image(encode(Image.fromarray(digit), "PCX"))
    assert err.value.reason == "not_an_image"


# ---------------------------------------------------------------------------------------------
# Photos: the center_crop policy (aspect kept, centre cut out, alpha on white)
# ---------------------------------------------------------------------------------------------


def bands(width: int, height: int) -> Image.Image:
    """Left quarter red, right quarter green, the middle half blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 4] = (255, 0, 0)
    array[:, width // 4 : 3 * width // 4] = (0, 0, 255)
    array[:, 3 * width // 4 :] = (0, 255, 0)
    return Image.fromarray(array, "RGB")


def test_center_crop_keeps_the_aspect_ratio_and_the_centre():
    wide = encode(bands(800, 400), "PNG")  # 2:1: the centre square is exactly the blue half
    photo = decode_image(wide, height=100, width=100, channels=3, resize_policy="center_crop")
    assert photo.shape == (100, 100, 3)
    assert photo.dtype == np.uint8
    inner = photo[:, 1:-1]  # (the outermost columns blend with their neighbours outside the crop, as resampling does)
    assert (inner[:, :, 2] > 250).all()
    assert inner[:, :, :2].max() < 5
    assert (photo[:, [0, -1], 2] > 200).all()
    squeezed = decode_image(wide, height=100, width=100, channels=3)  # the default plain resize
    assert squeezed[:, 5, 0].min() > 250
    assert squeezed[:, 95, 1].min() > 250


def test_center_crop_of_a_portrait_keeps_the_vertical_centre():
    tall = np.zeros((600, 300, 3), dtype=np.uint8)
    tall[150:450] = 200  # the middle half (a square 300x300) is grey, top and bottom black
    photo = decode_image(encode(Image.fromarray(tall), "JPEG", quality=95), height=64, width=64, channels=3, resize_policy="center_crop")
    inner = photo[1:-1]  # the outermost rows blend with the black just outside the crop
    assert abs(int(inner.min()) - 200) <= 6
    assert abs(int(inner.max()) - 200) <= 6
    assert photo[[0, -1]].min() > 150  # mostly grey even there: the black bands are cut off


def test_center_crop_upscales_small_photos():
    small = encode(bands(100, 80), "PNG")  # smaller than the input: the 80x80 centre is enlarged
    photo = decode_image(small, height=299, width=299, channels=3, resize_policy="center_crop")
    assert photo.shape == (299, 299, 3)
    assert photo[150, 150].tolist() == [0, 0, 255]
    # the 80x80 centre box spans x=10..90: a bit of red and green at its edges, blue in between
    assert photo[150, 0, 0] > 100
    assert photo[150, 298, 1] > 100


def test_photos_are_composited_on_white_digits_on_black(digit):
    rgba = np.zeros((40, 60, 4), dtype=np.uint8)
    rgba[10:30, 20:40] = (255, 0, 0, 255)  # an opaque red patch on a transparent page
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    photo = decode_image(data, height=40, width=60, channels=3, resize_policy="center_crop")
    assert photo[0, 0].tolist() == [255, 255, 255]
    assert photo[20, 30].tolist() == [255, 0, 0]
    as_digit = decode_image(data, height=40, width=60, channels=3)
    assert as_digit[0, 0].tolist() == [0, 0, 0]
    assert as_digit[20, 30].tolist() == [255, 0, 0]


def test_every_kind_of_photo_decodes_to_the_models_rgb_input():
    from sparktf_dev.testing import photo_files

    for name, (data, kind) in photo_files().items():
        array = decode_image(data, height=224, width=224, channels=3, resize_policy="center_crop")
        assert array.shape == (224, 224, 3), (name, kind)
        assert array.dtype == np.uint8, (name, kind)
        assert array.std() > 5, (name, kind)  # a real picture, not a blank
    cmyk = photo_files()["print/cmyk.jpg"][0]
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"


def test_default_policy_is_the_old_plain_resize(digit):
    data = encode(Image.fromarray(digit).resize((112, 70)), "PNG")
    assert np.array_equal(decode_image(data), decode_image(data, resize_policy="resize"))
    with pytest.raises(ValueError, match="resize_policy"):
        decode_image(data, resize_policy="letterbox")


def peak_memory_delta(action) -> int:
    """Bytes the process's resident set grew to above where it started, while ``action()`` ran.

    Pillow's buffers are not visible to tracemalloc, so this resets the kernel's high-water mark
    of this process (``/proc/self/clear_refs``) and reads it back afterwards.
    """

    def status(field: str) -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as err:
        pytest.skip(f"cannot reset the peak RSS here: {err}")
    before = status("VmRSS:")
    action()
    return status("VmHWM:") - before


def test_a_large_16bit_png_decodes_in_bounded_memory(digit):
    # 6000 x 6000 pixels pass the 40-megapixel cap; decoded they are 72 MB of 16-bit values.
    big = Image.fromarray(digit).resize((6000, 6000), Image.Resampling.BILINEAR)
    data = encode(Image.fromarray(np.asarray(big, dtype=np.uint16) * 257), "PNG", compress_level=1)
    del big
    decoded = {}
    peak = peak_memory_delta(lambda: decoded.update(array=decode_image(data)))
    assert peak < 200e6, f"decoding took {peak / 1e6:.0f} MB above the baseline"
    assert decoded["array"].shape == (28, 28, 1)
    assert np.corrcoef(decoded["array"].ravel().astype(float), digit.ravel().astype(float))[0, 1] > 0.95


def test_a_large_jpeg_is_decoded_at_reduced_scale(digit):
    photo = Image.fromarray(digit).resize((4032, 3024), Image.Resampling.BILINEAR).convert("RGB")
    data = encode(photo, "JPEG", quality=90)
    peak = peak_memory_delta(lambda: decode_image(data))
    assert peak < 30e6  # full size would be 4032 x 3024 x 4 bytes = 49 MB before any conversion
    array = decode_image(data, height=28, width=28)
    reference = np.asarray(Image.fromarray(digit).resize((28, 28)))  # the same digit, squashed to 4:3 and back
    assert np.corrcoef(array.ravel().astype(float), reference.ravel().astype(float))[0, 1] > 0.9


@pytest.mark.parametrize(
    ("orientation", "stored"),
    [
        (6, Image.Transpose.ROTATE_90),  # phone held upright: pixels stored turned left, tag says turn right
        (8, Image.Transpose.ROTATE_270),
        (3, Image.Transpose.ROTATE_180),
    ],
)
def test_exif_orientation_is_applied_before_resizing(digit, orientation, stored):
    upright = Image.fromarray(digit).resize((56, 84), Image.Resampling.BILINEAR)  # not square: sides matter
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(upright.transpose(stored), "JPEG", quality=95, exif=exif.tobytes())
    got = decode_image(data, height=84, width=56)[:, :, 0].astype(float)
    expected = np.asarray(upright, dtype=float)
    assert np.abs(got - expected).mean() < 6, "the photo was not turned upright"


def test_a_multi_frame_file_uses_its_first_frame(digit):
    first = Image.fromarray(digit).convert("P")
    second = Image.fromarray(255 - digit).convert("P")
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert np.array_equal(decode_image(data)[:, :, 0], digit)


def test_objects_over_the_byte_cap_are_set_aside_by_listed_size_without_a_get(bucket):
    from sparktf import fetch

    # "listed" at 10 MB but never written: were it fetched, its reason would be "missing".
    [(_key, array, reason, detail)] = list(
        fetch.fetch_decoded(
            bucket,
            ["never-fetched/huge.png"],
            height=28,
            width=28,
            channels=1,
            max_pixels=1_000_000,
            sizes={"never-fetched/huge.png": 10_000_000},
            max_bytes=5_000_000,
        )
    )
    assert (array, reason) == (None, "too_large")
    assert "not fetched" in detail
