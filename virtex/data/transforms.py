"""Image (+ caption) transforms on sample dicts, and reduced-size JPEG decoding.

A sample is a dict with ``"image"`` (a PIL image or a CHW tensor) and optionally
``"caption"`` (str); every transform returns a new dict with those keys updated.
Crops and resizes turn a PIL image into a uint8 CHW tensor (torch's vectorised antialiased
resize is about twice as fast as PIL's), :class:`ColorJitter` gives a float tensor
in [0, 1] and :class:`Normalize` a standardised float tensor. Randomness comes from
torch's global RNG, so seeding torch (per DataLoader worker) makes a pipeline
reproducible. Run pipelines with one intra-op thread, as DataLoader workers do.

Decoding (every path: :func:`decode`) gives upright 8-bit RGB as the original's
``cv2.imread`` does: EXIF orientation applied, every PIL mode converted by the rules of
:mod:`virtex.data.image_modes`. :func:`eval_transform` with ``resize_mode='exact'`` is the
original VirTex's evaluation transform pixel for pixel (:mod:`virtex.data.cv_resize`).

Reduced-size decoding. libjpeg can decode at 1/2, 1/4 or 1/8 scale (DCT scaling,
PIL's ``Image.draft``), skipping most of the work. Two rules use it:

* :func:`load_image` with ``min_side``: the largest factor that keeps the short side
  >= ``min_side``. For ``Resize(256)`` pass 256. For a random crop whose box is not
  known yet, :func:`crop_min_side` gives the short side at which the crop has the output
  resolution *in expectation*: a crop of area fraction s ~ U(a, b) has side
  sqrt(s) * side, so ``min_side = size / E[sqrt(s)]`` (296 for 224 and scale (0.2, 1)).
* :class:`RandomResizedCrop` on a lazily opened image (:func:`open_image`) does better:
  it samples the crop box first (only the header has been read), then decodes at the
  largest factor that keeps *that* box >= the output size on both sides, so no crop is
  ever upsampled more than it would be from the full-size decode.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, UnidentifiedImageError

from virtex.data.cv_resize import resize_linear, smallest_max_size
from virtex.data.image_modes import apply_orientation, orientation, oriented_size, to_rgb

try:  # deprecated in torchvision 0.29 (for TorchCodec); without it, PIL decodes everything
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
except ImportError:  # pragma: no cover - depends on the torchvision release
    decode_jpeg = None

from virtex.data.readers import DataFormatError
from virtex.errors import UserError

RESIZE_MODES = ("exact", "antialias")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # luma weights of torchvision's tensor ops (ITU-R 601-2)
_DRAFT_FACTORS = (8, 4, 2, 1)

Sample = dict


# ----------------------------------------------------------------------------- decoding
def _bomb(path: object, e: Exception) -> DataFormatError:
    return DataFormatError(f"image {path} is too large to decode safely ({e}); "
                           "expected at most PIL.Image.MAX_IMAGE_PIXELS "
                           f"({Image.MAX_IMAGE_PIXELS}) pixels")


def open_image(path: str | Path) -> Image.Image:
    """Open ``path`` lazily: only the header is read, pixels are decoded later.

    A header claiming more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (a decompression
    bomb, a warning in PIL up to twice the limit) is a :class:`DataFormatError` naming the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        raise DataFormatError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(path, e) from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataFormatError(f"cannot read image {path}: {e}") from None


def is_lazy(img: Image.Image) -> bool:
    """True while a PIL image from :func:`open_image` has not decoded its pixels."""
    return bool(getattr(img, "tile", None))


def draft_factor(width: int, height: int, need_w: int, need_h: int) -> int:
    """Largest DCT scale factor (8, 4, 2, 1) that keeps ``width x height`` >= the need."""
    for r in _DRAFT_FACTORS:
        if width // r >= need_w and height // r >= need_h:
            return r
    return 1


def decode(img: Image.Image, factor: int = 1) -> tuple[Image.Image, float]:
    """Finish decoding ``img`` as upright 8-bit RGB, at 1/``factor`` scale for a lazy JPEG.

    Upright: the EXIF orientation is applied (as the original's ``cv2.imread`` does); any
    mode becomes RGB by the rules of :mod:`virtex.data.image_modes`. Returns
    ``(image, scale)`` where ``scale`` is the factor actually used (original pixels per
    decoded pixel; 1.0 for an already decoded or non-JPEG image).
    """
    scale = 1.0
    path = getattr(img, "filename", "")
    try:
        turn = orientation(img)
        if is_lazy(img) and factor > 1:
            w, h = img.size
            drafted = img.draft("RGB", (max(1, w // factor), max(1, h // factor)))
            if drafted is not None:
                scale = w / drafted[1][2]
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = apply_orientation(to_rgb(img), turn)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(path, e) from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data, odd modes
        raise DataFormatError(f"cannot decode image {path}: {e}") from None
    return img, scale


def decode_tensor(img: Image.Image, factor: int = 1) -> tuple[torch.Tensor, float]:
    """Like :func:`decode` but gives a uint8 CHW tensor (RGB, channels-last memory).

    A lazy JPEG decoded at full size, opened from a file or from bytes in memory (a
    shard's ``io.BytesIO``), goes straight into a tensor with ``torchvision.io.decode_jpeg``
    (same libjpeg-turbo pixels as PIL, without PIL's copy out to numpy); anything else is
    decoded by PIL.
    """
    path = getattr(img, "filename", "")
    memory = getattr(img, "fp", None) if not path else None
    if (factor == 1 and is_lazy(img) and img.format == "JPEG" and img.mode in ("RGB", "L")
            and (path or isinstance(memory, io.BytesIO)) and decode_jpeg
            and orientation(img) == 1):
        try:
            with warnings.catch_warnings():  # the deprecation notice, once per image
                warnings.simplefilter("ignore", DeprecationWarning)
                data = read_file(str(path)) if path else \
                    torch.frombuffer(bytearray(memory.getbuffer()), dtype=torch.uint8)
                pixels = decode_jpeg(data, mode=ImageReadMode.RGB)
            img.close()
            return pixels, 1.0
        except RuntimeError:
            pass  # a JPEG variant torchvision rejects: PIL below decodes it or says why
    pil, scale = decode(img, factor)
    return _uint8_view(pil), scale


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode ``path`` as upright RGB; with ``min_side``, as small as keeps the short side >= it.

    The reduced decode uses JPEG DCT scaling (1/2, 1/4, 1/8), so it only happens when
    the image is at least twice as large as needed; other formats decode at full size.
    """
    img = open_image(path)
    factor = draft_factor(*oriented_size(img), min_side, min_side) if min_side else 1
    return decode(img, factor)[0]


def crop_min_side(size: int, scale: tuple[float, float] = (0.2, 1.0)) -> int:
    """Short side at which a random crop of area fraction U(scale) has ``size`` px in expectation.

    E[sqrt(s)] for s ~ U(a, b) is 2/3 (b^1.5 - a^1.5) / (b - a); the rule is
    ``ceil(size / E[sqrt(s)])``: 296 for 224 and scale (0.2, 1.0).
    """
    a, b = scale
    mean_root = math.sqrt(a) if b <= a else 2 / 3 * (b**1.5 - a**1.5) / (b - a)
    return math.ceil(size / mean_root)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _uint8_view(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image -> uint8 CHW tensor (RGB, channels-last); tensors pass through.

    The tensor is a read-only view of a copy of the pixels: callers make new tensors
    from it (resize, crop + copy, float) and never write into it.
    """
    if isinstance(img, torch.Tensor):
        return img
    arr = np.asarray(decode(img)[0])  # one copy, read-only; nothing writes into it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "NumPy array is not writable"
        return torch.from_numpy(arr).permute(2, 0, 1)


def _detach_pixels(out: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """``out``, copied if it still shares the read-only memory of ``pixels``."""
    if out.untyped_storage().data_ptr() == pixels.untyped_storage().data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return out


def to_float_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image or uint8 tensor -> float32 CHW tensor in [0, 1] (float tensors pass)."""
    x = _uint8_view(img)
    return x.float().div_(255).contiguous() if x.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------- composition
class Compose:
    """Apply transforms in order to a sample dict."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    @property
    def accepts_lazy_image(self) -> bool:
        """Whether the first transform decodes a lazily opened image itself."""
        return bool(self.transforms) and getattr(self.transforms[0], "accepts_lazy_image", False)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


# ----------------------------------------------------------------------------- geometry
class RandomResizedCrop:
    """Random area fraction in ``scale`` and aspect ratio in ``ratio``, resized to ``size``.

    On a lazily opened JPEG the crop box is sampled from the header size and the image
    is decoded at the largest DCT factor that keeps that box >= ``size`` (see module doc;
    ``reduced_decode=False`` always decodes at full size).
    """

    accepts_lazy_image = True

    def __init__(self, size: int | Sequence[int] = 224, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), reduced_decode: bool = True) -> None:
        self.size = _pair(size)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.reduced_decode = reduced_decode

    def params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Sample ``(top, left, height, width)`` of a crop, as torchvision does."""
        area = width * height
        for _ in range(10):
            u = torch.rand(2).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + u[1] * (self.log_ratio[1] - self.log_ratio[0]))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return top, left, h, w
        # Fallback: the largest centred crop with the ratio clamped to range.
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        aspect = width / height
        if aspect < lo:
            w, h = width, round(width / lo)
        elif aspect > hi:
            w, h = round(height * hi), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"]
        out_h, out_w = self.size
        if isinstance(img, torch.Tensor):
            top, left, h, w = self.params(img.shape[-1], img.shape[-2])
        else:
            top, left, h, w = self.params(*oriented_size(img))
            factor = draft_factor(w, h, out_w, out_h) if self.reduced_decode else 1
            img, s = decode_tensor(img, factor)
            if s != 1:  # the same box in decoded pixels
                top, left = round(top / s), round(left / s)
                h = max(1, min(round(h / s), img.shape[-2] - top))
                w = max(1, min(round(w / s), img.shape[-1] - left))
        out = F.resized_crop(img, top, left, h, w, [out_h, out_w], antialias=True)
        return {**sample, "image": _detach_pixels(out, img)}

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale})"


def check_resize_mode(mode: str, where: str = "resize_mode") -> str:
    """``mode`` if it is one of :data:`RESIZE_MODES`, else a :class:`UserError` naming ``where``."""
    if mode not in RESIZE_MODES:
        raise UserError(f"{where} = {mode!r}: expected one of "
                        + ", ".join(repr(m) for m in RESIZE_MODES))
    return mode


class Resize:
    """Resize the short side to ``size``, keeping the aspect ratio.

    ``mode='exact'`` (the original VirTex): full-size decode, new size by
    albumentations' SmallestMaxSize rule (:func:`smallest_max_size`), bilinear *without*
    antialiasing with exactly ``cv2.resize(INTER_LINEAR)``'s pixels (:mod:`cv_resize`).
    ``mode='antialias'`` (ours): torch's antialiased bilinear, the long side truncated,
    and a lazily opened JPEG decoded at the largest DCT factor keeping the short side >= size
    (``reduced_decode``).
    """

    accepts_lazy_image = True

    def __init__(self, size: int = 256, reduced_decode: bool = True,
                 mode: str = "antialias") -> None:
        self.size = size
        self.mode = check_resize_mode(mode, "Resize.mode")
        self.reduced_decode = reduced_decode and mode == "antialias"

    def _target(self, w: int, h: int) -> tuple[int, int]:
        """Output ``(width, height)`` for an input of ``w x h``."""
        if self.mode == "exact":
            new_h, new_w = smallest_max_size(h, w, self.size)
            return new_w, new_h
        if w <= h:
            return self.size, int(self.size * h / w)
        return int(self.size * w / h), self.size

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"]
        if isinstance(img, torch.Tensor):
            w, h = self._target(img.shape[-1], img.shape[-2])
        else:
            w, h = self._target(*oriented_size(img))
            factor = draft_factor(*oriented_size(img), self.size, self.size) \
                if self.reduced_decode else 1
            img = decode_tensor(img, factor)[0]
        if self.mode == "exact":
            hwc = img.permute(1, 2, 0).numpy()
            out = torch.from_numpy(resize_linear(hwc, h, w)).permute(2, 0, 1)
            return {**sample, "image": out}
        out = F.resize(img, [h, w], antialias=True)
        return {**sample, "image": _detach_pixels(out, img)}

    def __repr__(self) -> str:
        return f"Resize({self.size})" if self.mode == "antialias" \
            else f"Resize({self.size}, mode={self.mode!r})"


class CenterCrop:
    """Central ``size`` crop, top-left ``((H - h) // 2, (W - w) // 2)`` as the original's
    CenterCrop (torchvision rounds the halves instead); zero padding where the image is
    smaller."""

    def __init__(self, size: int | Sequence[int] = 224) -> None:
        self.size = _pair(size)

    def __call__(self, sample: Sample) -> Sample:
        img = _uint8_view(sample["image"])
        (h, w), (H, W) = self.size, img.shape[-2:]
        if H >= h and W >= w:
            top, left = (H - h) // 2, (W - w) // 2
            out = img[..., top: top + h, left: left + w]
        else:
            out = F.center_crop(img, list(self.size))
        if not isinstance(sample["image"], torch.Tensor):
            out = _detach_pixels(out, img)
        return {**sample, "image": out}

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _swap_word(m: re.Match) -> str:
    word = m.group(0)
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return new.upper()
    return new.capitalize() if word[0].isupper() else new


def swap_left_right(text: str) -> str:
    """Swap whole words "left" <-> "right" keeping case ("left-hand" -> "right-hand",
    "bright" unchanged)."""
    return _LEFT_RIGHT.sub(_swap_word, text)


_SUBSTRING = re.compile("left|right")
CAPTION_SWAPS = ("substring", "word")


def swap_left_right_substrings(text: str) -> str:
    """The original VirTex swap: on the normalised (lowercased) caption, every substring
    "left" becomes "right" and vice versa ("bright" -> "bleft", "leftover" -> "rightover")."""
    from virtex.data.tokenizer import normalize_caption

    return _SUBSTRING.sub(lambda m: "right" if m[0] == "left" else "left",
                          normalize_caption(text))


class HorizontalFlip:
    """Mirror the image with probability ``p``, and swap "left"/"right" in the caption:
    ``caption_swap='substring'`` as the original (:func:`swap_left_right_substrings`),
    ``'word'`` whole words only, keeping case (:func:`swap_left_right`)."""

    def __init__(self, p: float = 0.5, caption_swap: str = "substring") -> None:
        if caption_swap not in CAPTION_SWAPS:
            raise UserError(f"caption_swap = {caption_swap!r}: expected one of "
                            f"{', '.join(map(repr, CAPTION_SWAPS))}")
        self.p = p
        self.caption_swap = caption_swap
        self._swap = swap_left_right_substrings if caption_swap == "substring" \
            else swap_left_right

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()).item() >= self.p:
            return sample
        img = sample["image"]
        if isinstance(img, torch.Tensor):
            img = img.flip(-1)
        else:
            img = decode(img)[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = {**sample, "image": img}
        if isinstance(sample.get("caption"), str):
            out["caption"] = self._swap(sample["caption"])
        return out

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p}, caption_swap={self.caption_swap!r})"


# ----------------------------------------------------------------------------- colour
def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of a float CHW tensor, shape (1, H, W)."""
    return (_GRAY[0] * x[0] + _GRAY[1] * x[1] + _GRAY[2] * x[2]).unsqueeze(0)


_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the HSV hue of a float CHW tensor in [0, 1] by ``shift`` turns.

    Same result as ``torchvision.transforms.v2.functional.adjust_hue`` on float tensors,
    in fewer and cheaper passes: value v and chroma c stay, the hexagonal hue
    h in [0, 6) moves by 6 * shift, and channel n is rebuilt as
    ``v - c * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6`` (n = 5, 3, 1 for
    R, G, B).
    """
    r, g, b = x[0], x[1], x[2]
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    hc = torch.where(v == r, g - b,
                     torch.where(v == g, (b - r).add_(c, alpha=2), (r - g).add_(c, alpha=4)))
    k = hc.div_(c.clamp(min=1e-12)).add_(6.0 * shift) + _HUE_OFFSETS
    k -= torch.floor(k / 6.0).mul_(6.0)  # mod 6 (torch.remainder is several times slower)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(v, weight, c, value=-1.0)


class ColorJitter:
    """With probability ``p``: brightness, contrast, saturation and hue in random order.

    Factors are drawn as torchvision's ColorJitter does (uniform in ``[1 - x, 1 + x]``,
    hue in ``[-hue, hue]``) and applied with its float-tensor semantics (clamped to
    [0, 1] after every step). The output is a float CHW tensor in [0, 1].
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8) -> None:
        self.ranges = [(max(0.0, 1 - brightness), 1 + brightness),
                       (max(0.0, 1 - contrast), 1 + contrast),
                       (max(0.0, 1 - saturation), 1 + saturation), (-hue, hue)]
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()).item() >= self.p:
            return sample
        order = torch.randperm(4).tolist()
        u = torch.rand(4).tolist()
        factors = [lo + ui * (hi - lo) for (lo, hi), ui in zip(self.ranges, u)]
        return {**sample, "image": self.apply(sample["image"], order, factors)}

    @staticmethod
    def apply(image: Image.Image | torch.Tensor, order: Sequence[int],
              factors: Sequence[float]) -> torch.Tensor:
        """Apply ops ``order`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with
        ``factors`` (indexed by op) to ``image``; returns a new float tensor in [0, 1]."""
        x = to_float_tensor(image)
        if x is image:
            x = x.clone()  # the steps below work in place
        for op in order:
            f = factors[op]
            if op == 0 and f != 1:
                x = x.mul_(f).clamp_(0, 1)
            elif op == 1 and f != 1:
                mean = _gray(x).mean()
                x = x.mul_(f).add_((1 - f) * mean).clamp_(0, 1)
            elif op == 2 and f != 1:
                gray = _gray(x).mul_(1 - f)  # of the input, before x changes in place
                x = x.mul_(f).add_(gray).clamp_(0, 1)
            elif op == 3 and f != 0:
                x = adjust_hue(x, f)
        return x

    def __repr__(self) -> str:
        return f"ColorJitter(ranges={self.ranges}, p={self.p})"


class Normalize:
    """PIL image or tensor -> float32 CHW tensor standardised by ``mean``/``std``.

    uint8 input as the original (albumentations' Normalize, max pixel value 255), in
    float32: ``(x - 255 * mean) * (1 / (255 * std))`` (within 5e-7 of ``(x / 255 - mean) / std``);
    float input is taken to be in [0, 1]: ``(x - mean) / std``.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._shift = self.mean * 255  # uint8: (x - 255 mean) * 1 / (255 std), all float32
        self._scale = torch.reciprocal(self.std * 255)

    def __call__(self, sample: Sample) -> Sample:
        x = _uint8_view(sample["image"])
        if x.dtype == torch.uint8:
            x = x.float().sub_(self._shift).mul_(self._scale)
        else:
            x = (x - self.mean).div_(self.std)
        return {**sample, "image": x.contiguous()}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


# ----------------------------------------------------------------------------- presets
def train_transform(size: int = 224, scale: tuple[float, float] = (0.2, 1.0),
                    reduced_decode: bool = True, caption_swap: str = "substring") -> Compose:
    """VirTex pretraining augmentation: crop, flip (+ caption swap), colour jitter, normalise."""
    return Compose([RandomResizedCrop(size, scale, reduced_decode=reduced_decode),
                    HorizontalFlip(0.5, caption_swap), ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                    Normalize()])


def eval_transform(resize: int = 256, size: int = 224, resize_mode: str = "antialias") -> Compose:
    """Evaluation: short side to ``resize``, central ``size`` crop, normalise.

    ``resize_mode='exact'`` is the original VirTex's evaluation transform pixel for pixel
    (full decode, cv2-exact bilinear without antialiasing; see :class:`Resize`): the paper
    specs use it, with ``resize`` 224 for pretraining samples and 256 for VOC07 and captioning.
    ``'antialias'`` is ours (antialiased resize of a reduced-size JPEG decode).
    """
    return Compose([Resize(resize, mode=resize_mode), CenterCrop(size), Normalize()])


def eval_min_side(resize: int, resize_mode: str) -> int | None:
    """The ``min_side`` to decode at for :func:`eval_transform` (None: full size, for 'exact')."""
    return resize if check_resize_mode(resize_mode) == "antialias" else None
