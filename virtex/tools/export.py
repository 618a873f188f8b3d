"""Export a checkpoint's visual backbone as a plain torchvision ResNet state dict.

    python -m virtex.tools.export --ckpt runs/x/checkpoints/step_0500000.pt --out r50.pth
    python -m virtex.tools.export --ckpt ... --out r50.safetensors

The file loads with ``torchvision.models.resnet50().load_state_dict(...)`` (and so into
timm and detectron2's torchvision conversion); published VirTex checkpoints work too.
"""

from __future__ import annotations

import argparse
import sys

from virtex.checkpoint import load
from virtex.errors import UserError
from virtex.weights import export_backbone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m virtex.tools.export", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a virtex or published VirTex checkpoint")
    p.add_argument("--out", required=True, help="output .pth/.pt, or .safetensors")
    args = p.parse_args(argv)
    try:
        export_backbone(load(args.ckpt), args.out)
    except UserError as exc:
        print(f"export: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
