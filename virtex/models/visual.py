"""Visual backbone: a torchvision ResNet that returns its last feature map."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "wide_resnet50_2": torchvision.models.wide_resnet50_2,
}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet (random init, never downloaded) kept whole as ``self.cnn``.

    ``self.cnn`` keeps ``avgpool`` and ``fc`` so that ``self.cnn.state_dict()`` loads
    into a plain torchvision model; ``forward`` only runs ``conv1 .. layer4``.
    With ``frozen_bn=True`` every BatchNorm2d is a ``FrozenBatchNorm2d`` (fixed
    statistics and affine, no gradients); its state dict lacks ``num_batches_tracked``
    but otherwise has the same keys (``virtex.weights.backbone_state_dict`` fills them in).
    """

    def __init__(
        self, name: str = "resnet50", frozen_bn: bool = False, zero_init_residual: bool = True
    ):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; expected one of {sorted(RESNETS)}")
        self.name = name
        norm_layer = FrozenBatchNorm2d if frozen_bn else None
        self.cnn = RESNETS[name](
            weights=None, zero_init_residual=zero_init_residual, norm_layer=norm_layer
        )
        self.out_channels: int = self.cnn.fc.in_features
        # fc is kept only so the state dict loads into torchvision; forward never uses it,
        # and a parameter without a gradient would stall DDP's gradient reduction
        self.cnn.fc.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, C, H/32, W/32) feature map of ``layer4``."""
        cnn = self.cnn
        x = cnn.maxpool(cnn.relu(cnn.bn1(cnn.conv1(images))))
        return cnn.layer4(cnn.layer3(cnn.layer2(cnn.layer1(x))))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, C) globally average-pooled features."""
        return self(images).mean(dim=(2, 3))
