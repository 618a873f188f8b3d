"""The paper's evaluation transforms against the original VirTex's outputs (shared/fidelity §4).

Every photo of ``transforms/`` through ``pretrain_val`` (short side 224, crop 224) and
``voc07`` (short side 256, crop 224): the resized size, the crop offset and every uint8
pixel before Normalize equal the original's; the normalised tensor equals the original's
float32 formula.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from fidelity import FIDELITY, needs_fidelity

from virtex.data import transforms as T
from virtex.data.cv_resize import resize_linear, smallest_max_size

pytestmark = [needs_fidelity, pytest.mark.usefixtures("one_thread")]

DIR = FIDELITY / "transforms"
SIDES = {"pretrain_val": 224, "voc07": 256}


def _meta() -> dict:
    return json.loads((DIR / "transforms.json").read_text())["images"]


STEMS = sorted(_meta()) if DIR.is_dir() else []
CASES = [(stem, name) for stem in STEMS for name in SIDES]


def _hwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("stem", STEMS)
def test_decode_is_the_originals(stem: str) -> None:
    """cv2.imread's pixels: EXIF orientation applied, grey replicated (md5 of the decode)."""
    meta = _meta()[stem]
    img = T.load_image(DIR / meta["file"])
    pixels = np.asarray(img)
    assert list(pixels.shape) == meta["decoded_shape_hwc"]
    assert hashlib.md5(pixels.tobytes()).hexdigest() == meta["decoded_md5_rgb_uint8"]


@pytest.mark.parametrize("stem, name", CASES)
def test_resize_and_crop_are_the_originals(stem: str, name: str) -> None:
    meta = _meta()[stem]
    expected = np.load(DIR / meta[name]["file"])
    side = SIDES[name]
    h, w = meta["decoded_shape_hwc"][:2]
    assert list(smallest_max_size(h, w, side)) == meta[name]["resized_hw"]
    resized = T.Resize(side, mode="exact")({"image": T.open_image(DIR / meta["file"])})["image"]
    assert list(resized.shape[1:]) == meta[name]["resized_hw"] and resized.dtype == torch.uint8
    H, W = resized.shape[1:]
    assert [(H - 224) // 2, (W - 224) // 2] == meta[name]["crop_offset_yx"]
    for image in (T.open_image(DIR / meta["file"]), T.load_image(DIR / meta["file"])):
        crop = T.Compose([T.Resize(side, mode="exact"), T.CenterCrop(224)])({"image": image})
        pixels = _hwc(crop["image"])
        np.testing.assert_array_equal(pixels, expected)
        assert hashlib.md5(pixels.tobytes()).hexdigest() == meta[name]["md5"]
    top, left = meta[name]["crop_offset_yx"]
    np.testing.assert_array_equal(_hwc(resized)[top: top + 224, left: left + 224], expected)


@pytest.mark.parametrize("stem, name", CASES)
def test_normalised_output_is_the_original_formula(stem: str, name: str) -> None:
    meta = _meta()[stem]
    out = T.eval_transform(SIDES[name], 224, resize_mode="exact")(
        {"image": T.open_image(DIR / meta["file"])})["image"]
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    x = np.load(DIR / meta[name]["file"]).astype(np.float32)
    mean = np.array(T.IMAGENET_MEAN, np.float32) * np.float32(255)
    inv_std = np.reciprocal(np.array(T.IMAGENET_STD, np.float32) * np.float32(255))
    expected = ((x - mean) * inv_std).transpose(2, 0, 1)
    np.testing.assert_array_equal(out.numpy(), expected)
    plain = (x / 255 - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)
    assert np.abs(out.numpy() - plain.transpose(2, 0, 1)).max() <= 1e-6


def test_antialias_option_is_not_the_original() -> None:
    """Our antialiased resize stays available, and differs (the fidelity README's figures)."""
    meta = _meta()["china"]
    ours = T.Compose([T.Resize(256, mode="antialias"), T.CenterCrop(224)])(
        {"image": T.open_image(DIR / meta["file"])})["image"]
    diff = np.abs(_hwc(ours).astype(int) - np.load(DIR / meta["voc07"]["file"]))
    assert ours.shape == (3, 224, 224) and diff.max() > 20


def test_exact_resize_matches_opencv_on_random_sizes() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w, nh, nw = (int(v) for v in rng.integers(1, 300, 4))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize_linear(image, nh, nw), expected)


def _normalised(stem: str, name: str) -> torch.Tensor:
    """The original's normalised CHW tensor of ``stem`` through transform ``name``."""
    meta = _meta()[stem]
    return T.Normalize()({"image": torch.from_numpy(np.load(DIR / meta[name]["file"])).permute(
        2, 0, 1)})["image"]


@pytest.fixture
def spec_objects():
    """Build a component as a paper spec configures it: ``build(spec, kind, name, params)``."""
    import gin

    from virtex.experiment import load_spec
    from virtex.registry import get_registry

    registry = get_registry()

    def build(spec: str, kind: str, name: str, params: list[str], **kwargs: object) -> object:
        load_spec(spec, params, registry)
        return registry.get(kind, name)(**kwargs)

    yield build
    gin.clear_config()


def test_paper_specs_use_the_original_transforms(spec_objects) -> None:
    """The evaluation images of the paper specs are the original's, pixel for pixel."""
    from virtex.plugins.captioning.captioner import _ImageFiles
    from virtex.plugins.classification import _eval_transform

    photo = DIR / _meta()["grace_hopper"]["file"]
    voc = spec_objects("downstream/voc07", "evaluators", "voc07_svm",
                       ["ckpt=None", "data_root=unused"])
    assert (voc.resize, voc.image_size, voc.resize_mode) == (256, 224, "exact")
    got = voc.transform()({"image": T.open_image(photo)})["image"]
    assert torch.equal(got, _normalised("grace_hopper", "voc07"))
    sample_tf = spec_objects("pretrain/bicap_r50", "transforms", "eval", [])
    got = sample_tf({"image": T.open_image(photo)})["image"]
    assert torch.equal(got, _normalised("grace_hopper", "pretrain_val"))
    for spec, name, params in [("inference/caption_folder", "caption_folder", ["images=x"]),
                               ("downstream/captioning", "coco_captioning", [])]:
        evaluator = spec_objects(spec, "evaluators", name, ["ckpt=None", *params],
                                 **({} if name == "caption_folder" else {"root": "x"}))
        d = evaluator.decoding
        item = _ImageFiles([photo], d["resize"], d["image_size"], None, d["resize_mode"])[0]
        assert torch.equal(item["image"], _normalised("grace_hopper", "voc07")), spec
    # ImageNet and iNaturalist validation images: the same short side 256 and crop 224.
    for spec, name in [("downstream/imagenet", "imagenet_linear"),
                       ("downstream/inat", "inaturalist")]:
        evaluator = spec_objects(spec, "evaluators", name, ["ckpt=None", "data_root=x"])
        assert evaluator.resize_mode == "exact", spec
        tf = _eval_transform(evaluator.image_size, evaluator.resize, evaluator.resize_mode)
        got = tf({"image": T.open_image(photo)})["image"]
        assert torch.equal(got, _normalised("grace_hopper", "voc07")), spec
