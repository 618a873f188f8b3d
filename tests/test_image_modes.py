"""Every image mode PIL opens decodes to the right 8-bit RGB; EXIF orientation; bombs.

Each fixture is a real file written in its format (PNG, TIFF, JPEG) into tmp_path, and
each test checks known pixel values after :func:`virtex.data.transforms.load_image`.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from virtex.plugins.captioning.captioner import _ImageFiles

from virtex.data import transforms as T
from virtex.data.readers import DataFormatError
from virtex.evaluation.features import _Images

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoded(path: Path, mode: str) -> np.ndarray:
    """RGB pixels of ``path`` (checking PIL opens it in ``mode``), by every decode entry point."""
    assert Image.open(path).mode == mode
    rgb = T.load_image(path)
    assert rgb.mode == "RGB"
    pixels = np.asarray(rgb)
    lazy = T.decode_tensor(T.open_image(path))[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(lazy, pixels)
    # from bytes in memory, as a caption shard's image is read
    memory = T.decode_tensor(T.open_image(io.BytesIO(path.read_bytes())))[0]
    np.testing.assert_array_equal(memory.permute(1, 2, 0).numpy(), pixels)
    return pixels


def _gray_row(pixels: np.ndarray) -> list[int]:
    assert (pixels == pixels[..., :1]).all()  # grey replicated to three channels
    return pixels[0, :, 0].tolist()


@pytest.mark.parametrize("dtype, suffix, mode", [("<u2", ".png", "I;16"), (">u2", ".tif", "I;16B"),
                                                 ("<u2", ".tif", "I;16")])
def test_16_bit_is_scaled_not_clipped(tmp_path: Path, dtype: str, suffix: str, mode: str) -> None:
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(np.array([[0, 255, 256, 40000, 65535]], dtype=dtype)).save(path)
    assert _gray_row(_decoded(path, mode)) == [0, 0, 1, 156, 255]  # the high byte, v >> 8


def test_32_bit_int_is_taken_as_16_bit(tmp_path: Path) -> None:
    path = tmp_path / "int.tif"
    Image.fromarray(np.array([[40000, -5, 70000, 512]], dtype=np.int32)).save(path)
    assert _gray_row(_decoded(path, "I")) == [156, 0, 255, 2]


def test_float_is_on_the_0_255_scale(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[100.4, 100.6, -3.0, 300.0, 0.5]], dtype=np.float32)).save(path)
    assert _gray_row(_decoded(path, "F")) == [100, 101, 0, 255, 0]  # rounded (ties to even)


def test_palette_with_transparency_keeps_the_colour(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([200, 10, 20, 1, 2, 3])
    img.putpixel((3, 1), 1)
    path = tmp_path / "trns.png"
    img.save(path, transparency=0)
    assert "transparency" in Image.open(path).info
    pixels = _decoded(path, "P")
    assert pixels[0, 0].tolist() == [200, 10, 20] and pixels[1, 3].tolist() == [1, 2, 3]


def test_gray_alpha_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (3, 2), (100, 0)).save(path)
    assert _decoded(path, "LA")[1, 2].tolist() == [100, 100, 100]


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    img = Image.new("RGBA", (3, 2), (10, 20, 30, 0))  # fully transparent: the colour stays
    img.putpixel((1, 1), (250, 128, 3, 77))
    img.save(path)
    pixels = _decoded(path, "RGBA")
    assert pixels[0, 0].tolist() == [10, 20, 30] and pixels[1, 1].tolist() == [250, 128, 3]


def _strip_adobe(data: bytes) -> bytes:
    """JPEG bytes without their APP14 "Adobe" segment."""
    at = data.index(b"\xff\xee")
    length = struct.unpack(">H", data[at + 2: at + 4])[0]
    return data[:at] + data[at + 2 + length:]


@pytest.mark.parametrize("adobe", [True, False])
def test_cmyk_jpeg(tmp_path: Path, adobe: bool) -> None:
    cmyk = (50, 100, 150, 40)
    path = tmp_path / "cmyk.jpg"
    if adobe:  # PIL writes Adobe-inverted CMYK (as Photoshop does) and undoes it on reading
        Image.new("CMYK", (16, 16), cmyk).save(path, quality=100)
    else:  # plain CMYK: the stored values are the ink amounts, no Adobe marker
        Image.new("CMYK", (16, 16), tuple(255 - v for v in cmyk)).save(path, quality=100)
        path.write_bytes(_strip_adobe(path.read_bytes()))
    opened = Image.open(path)
    assert ("adobe" in opened.info) == adobe
    # PIL takes every CMYK JPEG for Adobe-inverted: right with the marker, inverted without
    stored = cmyk if adobe else tuple(255 - v for v in cmyk)
    assert np.asarray(opened)[8, 8].tolist() == list(stored)
    # R = round((255 - C) (255 - K) / 255): 205 * 215 / 255 = 172.8 -> 173, ...
    assert _decoded(path, "CMYK")[8, 8].tolist() == [173, 131, 89]


def test_gray(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)).save(path)
    assert _gray_row(_decoded(path, "L")) == [0, 77, 255]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_decodes_alike_from_a_file_and_from_bytes(tmp_path: Path, mode: str) -> None:
    """torchvision's decode (a file, or bytes as a caption shard holds them) gives PIL's pixels."""
    path = tmp_path / f"{mode}.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).convert(mode).save(path, quality=90)
    pixels = _decoded(path, mode)
    assert pixels.shape == (24, 40, 3) and len(np.unique(pixels)) > 100


def test_bilevel(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    Image.fromarray(np.array([[True, False, True]])).save(path)
    assert _gray_row(_decoded(path, "1")) == [255, 0, 255]


# ----------------------------------------------------------------------------- EXIF orientation
_INVERSE = {  # what to store so that the EXIF operation of each orientation gives the upright
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}
_QUADRANTS = [[(250, 0, 0), (0, 250, 0)], [(0, 0, 250), (250, 250, 250)]]  # TL TR / BL BR


def _upright() -> np.ndarray:
    """A 64 x 96 (h x w) picture: red, green / blue, white quadrants (flat 16 px blocks)."""
    return np.kron(np.array(_QUADRANTS, np.uint8), np.ones((32, 48, 1), np.uint8))


def _oriented_jpeg(path: Path, orientation: int) -> Path:
    stored = Image.fromarray(_upright())
    if orientation in _INVERSE:
        stored = stored.transpose(_INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif.tobytes())
    return path


def _quadrant_colours(pixels: np.ndarray) -> list:
    h, w = pixels.shape[:2]
    return [[pixels[y, x].astype(int) for x in (w // 4, 3 * w // 4)] for y in (h // 4, 3 * h // 4)]


def _assert_upright(pixels: np.ndarray) -> None:
    got = _quadrant_colours(pixels)
    for row, expected_row in zip(got, _QUADRANTS):
        for colour, expected in zip(row, expected_row):
            assert np.abs(colour - np.array(expected)).max() <= 6, (got, _QUADRANTS)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_in_every_decode_path(tmp_path: Path, orientation: int) -> None:
    path = _oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    assert (Image.open(path).size == (96, 64)) == (orientation <= 4)
    full = np.asarray(T.load_image(path))
    assert full.shape == (64, 96, 3)
    _assert_upright(full)
    again = T.decode(T.load_image(path))[0]  # decoding a decoded image does not turn it again
    np.testing.assert_array_equal(np.asarray(again), full)
    _assert_upright(T.decode_tensor(T.open_image(path))[0].permute(1, 2, 0).numpy())
    memory = T.decode_tensor(T.open_image(io.BytesIO(path.read_bytes())))[0]
    _assert_upright(memory.permute(1, 2, 0).numpy())
    for resize in (T.Resize(32, mode="exact"), T.Resize(32, mode="antialias")):
        out = resize({"image": T.open_image(path)})["image"]
        assert out.shape == (3, 32, 48)
        _assert_upright(out.permute(1, 2, 0).numpy())
    crop = T.RandomResizedCrop((32, 48), scale=(1.0, 1.0), ratio=(1.5, 1.5))  # the whole image
    _assert_upright(crop({"image": T.open_image(path)})["image"].permute(1, 2, 0).numpy())


def test_exif_orientation_with_reduced_decode(tmp_path: Path) -> None:
    big = Image.fromarray(_upright()).resize((960, 640), Image.Resampling.NEAREST)
    path = tmp_path / "big6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    big.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())
    small = T.load_image(path, min_side=150)  # 1/4 DCT decode of the 640 x 960 stored picture
    assert small.size == (240, 160)
    _assert_upright(np.asarray(small))
    out = T.eval_transform(150, 128)({"image": T.open_image(path)})["image"]
    assert out.shape == (3, 128, 128)


# ----------------------------------------------------------------------------- decompression bombs
def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` RGB pixels (the data is a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [30000, 10000])  # PIL: an error above 2x the limit, a warning above
def test_decompression_bomb_is_one_clear_error(tmp_path: Path, side: int) -> None:
    path = _png_header(tmp_path / f"bomb{side}.png", side, side)
    assert side * side > Image.MAX_IMAGE_PIXELS
    for decode in (T.open_image, T.load_image, lambda p: T.load_image(p, min_side=224)):
        with pytest.raises(DataFormatError, match=rf"bomb{side}\.png.*too large"):
            decode(path)
    with pytest.raises(DataFormatError, match=rf"bomb{side}\.png"):
        _Images([path], T.eval_transform(256, 224, "exact"), None)[0]
    item = _ImageFiles([path], 256, 224, None, "exact")[0]  # captioning reports and skips it
    assert item["index"] == 0 and "too large" in item["error"]


def test_train_transform_on_every_mode(tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 50), 40000, np.uint16)).save(tmp_path / "a.png")
    Image.new("CMYK", (50, 40), (0, 0, 0, 0)).save(tmp_path / "b.jpg")
    Image.new("LA", (50, 40), (200, 9)).save(tmp_path / "c.png")
    torch.manual_seed(0)
    tf = T.train_transform(32)
    for name in ("a.png", "b.jpg", "c.png"):
        out = tf({"image": T.open_image(tmp_path / name), "caption": "x"})["image"]
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
