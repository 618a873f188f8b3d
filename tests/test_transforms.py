"""Transforms: caption-aware flip, reduced-size JPEG decoding, colour jitter, presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F2
from PIL import Image

from virtex.data import transforms as V
from virtex.data.readers import DataFormatError
from virtex.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1600x1200 photo-like JPEG (smooth colour field + texture)."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((1600, 1200), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(field + rng.integers(-3, 4, field.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _pixels(img: Image.Image | torch.Tensor) -> np.ndarray:
    """HWC int array of a PIL image or a uint8 CHW tensor."""
    if isinstance(img, torch.Tensor):
        return img.permute(1, 2, 0).numpy().astype(int)
    return np.asarray(img).astype(int)


# ----------------------------------------------------------------------------- flip
@pytest.mark.parametrize("text, expected", [
    ("a dog on the left", "a dog on the right"),
    ("right of the cat, left of the box", "left of the cat, right of the box"),
    ("Left side", "Right side"),
    ("RIGHT now", "LEFT now"),
    ("a left-hand glove", "a right-hand glove"),
    ("the bright light", "the bright light"),
    ("leftover copyright", "leftover copyright"),
    ("left's", "right's"),
    ("(left)", "(right)"),
    ("leftright", "leftright"),
    ("", ""),
])
def test_swap_left_right(text: str, expected: str) -> None:
    assert V.swap_left_right(text) == expected
    assert V.swap_left_right(expected) == text  # an involution


def test_flip_mirrors_pixels_and_caption() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    sample = {"image": Image.fromarray(arr), "caption": "a cat left of a bright dog"}
    out = V.HorizontalFlip(p=1.0, caption_swap="word")(sample)
    np.testing.assert_array_equal(np.asarray(out["image"]), arr[:, ::-1])
    assert out["caption"] == "a cat right of a bright dog"
    # The original's swap: substrings of the lowercased caption.
    original = V.HorizontalFlip(p=1.0)({**sample, "caption": "A Cat LEFT of a bright Crème"})
    assert original["caption"] == "a cat right of a bleft creme"
    assert sample["caption"] == "a cat left of a bright dog"  # input left untouched
    t = torch.from_numpy(arr).permute(2, 0, 1)
    np.testing.assert_array_equal(_pixels(V.HorizontalFlip(1.0)({"image": t})["image"]),
                                  arr[:, ::-1])
    same = V.HorizontalFlip(p=0.0)(sample)
    assert same["caption"] == sample["caption"] and same["image"] is sample["image"]


@pytest.mark.parametrize("text, expected", [
    ("a dog on the left", "a dog on the right"),
    ("leftover copyright", "rightover copyleft"),
    ("leftright", "rightleft"),
    ("Right", "left"),
])
def test_swap_left_right_substrings_as_the_original(text: str, expected: str) -> None:
    assert V.swap_left_right_substrings(text) == expected


def test_bad_caption_swap() -> None:
    with pytest.raises(UserError, match=r"caption_swap = 'words': expected one of 'substring'"):
        V.HorizontalFlip(caption_swap="words")


def test_flip_probability() -> None:
    torch.manual_seed(0)
    flip = V.HorizontalFlip(0.5)
    flips = sum(flip({"image": torch.zeros(3, 2, 2), "caption": "left"})["caption"] == "right"
                for _ in range(400))
    assert 150 < flips < 250


# ----------------------------------------------------------------------------- decoding
def test_draft_factor() -> None:
    assert V.draft_factor(640, 480, 224, 224) == 2
    assert V.draft_factor(447, 480, 224, 224) == 1
    assert V.draft_factor(4000, 3000, 224, 224) == 8
    assert V.draft_factor(100, 100, 224, 224) == 1
    assert V.crop_min_side(224, (0.2, 1.0)) == 296
    assert V.crop_min_side(224, (1.0, 1.0)) == 224


def test_draft_decode_is_smaller_and_faithful(big_jpeg: Path) -> None:
    full = V.load_image(big_jpeg)
    assert full.size == (1600, 1200) and full.mode == "RGB"
    small = V.load_image(big_jpeg, min_side=224)
    assert small.mode == "RGB" and min(small.size) >= 224
    assert small.size == (400, 300)  # 1/4: 1/8 would give 150 < 224
    assert V.load_image(big_jpeg, min_side=700).size == (1600, 1200)
    assert V.load_image(big_jpeg, min_side=600).size == (800, 600)
    # Same picture: compare with a full decode shrunk to the same size.
    ref = full.resize(small.size, Image.Resampling.BOX)
    assert np.abs(_pixels(small) - _pixels(ref)).mean() < 4


def test_lazy_crop_uses_reduced_decode_faithfully(big_jpeg: Path) -> None:
    crop = V.RandomResizedCrop(224, scale=(0.5, 1.0))
    for seed in range(4):
        torch.manual_seed(seed)
        lazy = crop({"image": V.open_image(big_jpeg)})["image"]
        torch.manual_seed(seed)
        eager = crop({"image": V.load_image(big_jpeg)})["image"]
        assert lazy.shape == eager.shape == (3, 224, 224) and lazy.dtype == torch.uint8
        assert np.abs(_pixels(lazy) - _pixels(eager)).mean() < 4
    # Crops of >= half the area of a 1600x1200 image are >= 2x 224: never a full decode.
    img = V.open_image(big_jpeg)
    top, left, h, w = crop.params(*img.size)
    assert V.draft_factor(w, h, 224, 224) >= 2


def test_crop_params_follow_scale_and_ratio() -> None:
    crop = V.RandomResizedCrop(224, scale=(0.2, 1.0))
    torch.manual_seed(0)
    areas = []
    for _ in range(300):
        top, left, h, w = crop.params(640, 480)
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        areas.append(w * h / (640 * 480))
    assert min(areas) >= 0.19 and max(areas) <= 1.0 and 0.4 < np.mean(areas) < 0.65
    assert crop.params(1000, 10) == (0, 493, 10, 13)  # fallback: centred, ratio clamped


def test_crop_reproducible(big_jpeg: Path) -> None:
    tf = V.train_transform()
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(tf({"image": V.open_image(big_jpeg), "caption": "left"}))
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert outs[0]["caption"] == outs[1]["caption"]


def test_grayscale_and_png_inputs(tmp_path: Path) -> None:
    Image.new("L", (300, 200), 128).save(tmp_path / "g.jpg")
    Image.new("RGBA", (300, 200), (10, 20, 30, 255)).save(tmp_path / "c.png")
    for name in ("g.jpg", "c.png"):
        out = V.train_transform(64)({"image": V.open_image(tmp_path / name)})["image"]
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        assert V.load_image(tmp_path / name, 50).mode == "RGB"


def test_bad_image_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="nope.jpg"):
        V.open_image(tmp_path / "nope.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match="junk.jpg"):
        V.open_image(tmp_path / "junk.jpg")


def test_truncated_jpeg_is_named(big_jpeg: Path, tmp_path: Path) -> None:
    data = big_jpeg.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    for tf in (V.RandomResizedCrop(224, scale=(0.02, 0.03)), V.Resize(256)):  # 1/1, 1/4
        with pytest.raises(DataFormatError, match="cut.jpg.*truncated"):
            tf({"image": V.open_image(cut)})


# ----------------------------------------------------------------------------- colour
_TV_OPS = [F2.adjust_brightness, F2.adjust_contrast, F2.adjust_saturation, F2.adjust_hue]


@pytest.mark.parametrize("shift", [-0.5, -0.1, -0.03, 0.0, 0.07, 0.1, 0.5])
def test_adjust_hue_matches_torchvision(shift: float) -> None:
    x = torch.rand(3, 40, 50)
    x[:, :5, :5] = 0.5  # grey: no hue
    torch.testing.assert_close(V.adjust_hue(x, shift), F2.adjust_hue(x, shift), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_color_jitter_matches_torchvision(order: list[int]) -> None:
    x = torch.rand(3, 40, 50)
    factors = [1.35, 0.7, 1.3, -0.08]
    expected = x
    for op in order:
        expected = _TV_OPS[op](expected, factors[op])
    got = V.ColorJitter.apply(x, order, factors)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got is not x and not torch.equal(got, x)


def test_color_jitter_sampling() -> None:
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    jitter = V.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)
    outs = [jitter({"image": img})["image"] for _ in range(200)]
    applied = sum(isinstance(o, torch.Tensor) for o in outs)
    assert 130 < applied < 190
    assert all(o.min() >= 0 and o.max() <= 1 for o in outs if isinstance(o, torch.Tensor))


# ----------------------------------------------------------------------------- normalise, presets
def test_normalize_paths_agree() -> None:
    arr = np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    norm = V.Normalize()
    a = norm({"image": Image.fromarray(arr)})["image"]
    b = norm({"image": torch.from_numpy(arr).permute(2, 0, 1)})["image"]
    c = norm({"image": torch.from_numpy(arr).permute(2, 0, 1).float() / 255})["image"]
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255
                - torch.tensor(V.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
                    V.IMAGENET_STD).view(3, 1, 1)
    for x in (a, b, c):
        assert x.dtype == torch.float32 and x.shape == (3, 8, 9) and x.is_contiguous()
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_eval_transform(big_jpeg: Path) -> None:
    tf = V.eval_transform(256, 224)
    assert tf.accepts_lazy_image and V.train_transform().accepts_lazy_image
    lazy = tf({"image": V.open_image(big_jpeg)})["image"]  # decoded at 1/4: 400x300
    eager = tf({"image": V.load_image(big_jpeg)})["image"]
    assert lazy.shape == eager.shape == (3, 224, 224)
    assert (lazy - eager).abs().mean() < 0.05
    resized = V.Resize(256)({"image": V.load_image(big_jpeg)})["image"]
    assert resized.shape == (3, 256, 341)
    small = V.CenterCrop(224)({"image": Image.new("RGB", (100, 300), (255, 255, 255))})["image"]
    assert small.shape == (3, 224, 224) and small[:, :, 0].sum() == 0  # zero padded


def test_train_transform_output(big_jpeg: Path) -> None:
    torch.manual_seed(0)
    tf = V.train_transform()
    for _ in range(5):
        out = tf({"image": V.open_image(big_jpeg), "caption": "on the left"})
        assert out["image"].shape == (3, 224, 224) and out["image"].dtype == torch.float32
        assert out["caption"] in ("on the left", "on the right")


def test_center_crop_offsets_are_floored() -> None:
    """Top-left ((H - h) // 2, (W - w) // 2), the original's rule, also for odd margins."""
    arr = np.arange(7 * 10, dtype=np.uint8).reshape(7, 10, 1).repeat(3, axis=2)
    out = V.CenterCrop((4, 5))({"image": torch.from_numpy(arr).permute(2, 0, 1)})["image"]
    np.testing.assert_array_equal(_pixels(out), arr[1:5, 2:7])  # margins 3 and 5: floor 1, 2
    out = V.CenterCrop((4, 5))({"image": Image.fromarray(arr)})["image"]
    np.testing.assert_array_equal(_pixels(out), arr[1:5, 2:7])


def test_exact_resize_sizes_and_modes() -> None:
    img = Image.new("RGB", (512, 600), (9, 99, 199))
    assert V.Resize(224, mode="exact")({"image": img})["image"].shape == (3, 262, 224)  # ties even
    assert V.Resize(224)({"image": img})["image"].shape == (3, 262, 224)  # int(262.5) truncates
    assert V.Resize(224, mode="exact")({"image": Image.new("RGB", (600, 513))})["image"].shape \
        == (3, 224, 262)  # 261.98 rounds up, truncation gave 261
    assert V.Resize(224)({"image": Image.new("RGB", (600, 513))})["image"].shape == (3, 224, 261)
    flat = V.Resize(100, mode="exact")({"image": img})["image"]
    assert (flat == torch.tensor([9, 99, 199], dtype=torch.uint8).view(3, 1, 1)).all()
    assert "exact" in repr(V.eval_transform(256, 224, "exact"))
    assert V.eval_min_side(256, "exact") is None and V.eval_min_side(256, "antialias") == 256


def test_bad_resize_mode_names_the_binding() -> None:
    from virtex.plugins.captioning import CaptionFolder, CaptionSamples
    from virtex.plugins.data import evaluation
    from virtex.plugins.voc07 import VOC07SVM

    from virtex.errors import UserError

    with pytest.raises(UserError, match=r"transforms\.eval\.resize_mode = 'cv2'.*'exact', 'antialias'"):
        evaluation(resize_mode="cv2")
    with pytest.raises(UserError, match=r"evaluators\.voc07_svm\.resize_mode = 'bilinear'"):
        VOC07SVM("x", resize_mode="bilinear")
    with pytest.raises(UserError, match=r"evaluators\.caption_folder\.resize_mode"):
        CaptionFolder("x", resize_mode="Exact")
    with pytest.raises(UserError, match=r"evaluators\.caption_samples\.resize_mode"):
        CaptionSamples("x", resize_mode="")
    with pytest.raises(UserError, match=r"Resize\.mode = 'x'"):
        V.Resize(10, mode="x")
