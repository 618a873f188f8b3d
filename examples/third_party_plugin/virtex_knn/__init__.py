"""A k-NN evaluator for virtex: frozen pooled features, cosine similarity, top-1 accuracy."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2 as T

import virtex
from virtex.data.readers import read_image_folder
from virtex.evaluation.api import EvalRequest, EvalResult, inference


class KNN:
    """Classify each ``val`` image by a vote of its ``k`` nearest ``train`` images."""

    def __init__(self, root: str, k: int = 20, image_size: int = 224, batch_size: int = 64):
        self.root, self.k, self.image_size, self.batch_size = root, k, image_size, batch_size

    def _features(self, backbone: torch.nn.Module, paths: list[Path], device) -> torch.Tensor:
        transform = T.Compose([
            T.ToImage(), T.Resize(self.image_size), T.CenterCrop(self.image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        feats = []
        for i in range(0, len(paths), self.batch_size):
            images = [transform(Image.open(p).convert("RGB")) for p in paths[i:i + self.batch_size]]
            x = torch.stack(images).to(device)
            feats.append(F.normalize(backbone(x).mean(dim=(2, 3)), dim=1).cpu())
        return torch.cat(feats)

    def __call__(self, request: EvalRequest) -> EvalResult:
        train_paths, train_y, classes = read_image_folder(self.root, "train")
        val_paths, val_y, _ = read_image_folder(self.root, "val")
        with inference(request.backbone):  # eval mode, no gradients; restored afterwards
            train = self._features(request.backbone, train_paths, request.device)
            val = self._features(request.backbone, val_paths, request.device)
        sims, idx = (val @ train.T).topk(min(self.k, len(train_paths)), dim=1)
        votes = torch.zeros(len(val_paths), len(classes))
        votes.scatter_add_(1, torch.as_tensor(train_y)[idx], sims.exp())
        top1 = (votes.argmax(1) == torch.as_tensor(val_y)).float().mean().item()
        return EvalResult({"knn/top1": 100.0 * top1})


@virtex.hookimpl
def virtex_evaluators() -> dict:
    return {"knn": KNN}


@virtex.hookimpl
def virtex_spec_dirs() -> list[Path]:
    return [Path(__file__).parent / "specs"]
