"""A published-layout checkpoint with its own vocabulary captions a folder of real photos
through specs/inference/caption_folder.gin exactly as the original pipeline does.

The reference is built from the original's own figures: its evaluation transform's output
for each photo (``transforms/<stem>.voc07.npy``, 256 -> crop 224, the image-folder
captioning transform), normalised with the original's formula, through the checkpoint
(whose logits equal the original's, tests/test_fidelity_decoding.py) and the original's
beam search, decoded with its vocabulary."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from cli import REPO, run_cli
from fidelity import FIDELITY, needs_fidelity

from virtex.data.tokenizer import SentencePieceTokenizer

pytestmark = needs_fidelity
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _reference(stems: list[str]) -> dict[str, str]:
    from fidelity_model import load_fidelity_model

    pixels = np.stack([np.load(FIDELITY / "transforms" / f"{s}.voc07.npy") for s in stems])
    x = (pixels.astype(np.float32) - 255 * MEAN) * (np.float32(1) / (255 * STD))
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    model = load_fidelity_model()
    tok = SentencePieceTokenizer(FIDELITY / "vocab" / "golden_1k.model")
    with torch.no_grad():
        ids = model.generate(images, method="beam", beam_size=5, max_length=30, decoder="paper")
    return {f"{s}.jpg": tok.decode(i) for s, i in zip(stems, ids)}


def test_published_checkpoint_captions_real_photos_as_the_original(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    stems = []
    for jpg in sorted((FIDELITY / "transforms").glob("*.jpg")):
        shutil.copy(jpg, photos / jpg.name)
        stems.append(jpg.stem)
    assert len(stems) == 6
    run = tmp_path / "run"
    res = run_cli(str(REPO / "specs" / "inference" / "caption_folder.gin"),
                  "--gin_param", f"ckpt={FIDELITY / 'model' / 'orig_ckpt.pth'}",
                  "--gin_param", f"vocab={FIDELITY / 'vocab' / 'golden_1k.model'}",
                  "--gin_param", f"images={photos}",
                  "--gin_param", "visual=@backbones.resnet18()",
                  "--gin_param", "experiment.backbone=@backbones.resnet18",
                  "--gin_param", "textual_size='L1_H128_A2_F512'",
                  "--gin_param", "evaluators.caption_folder.num_workers=0",
                  "--run_dir", str(run), cwd=tmp_path, env={"VIRTEX_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr
    rows = json.loads((run / "captions.json").read_text())
    got = {r["filename"]: r["caption"] for r in rows}
    want = _reference(stems)
    assert got == want
    assert len(set(want.values())) > 1  # the captions depend on the photo
    assert "6 image(s) captioned, 0 file(s) skipped" in res.stdout
