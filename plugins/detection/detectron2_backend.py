"""The detectron2 backend: what the paper ran. detectron2's model-zoo configs set to the
paper's values, its ``DefaultTrainer`` (with PreciseBN, checkpoints and resume), and its
``COCOEvaluator`` / ``LVISEvaluator`` / ``PascalVOCDetectionEvaluator``; the datasets are
our readers' records registered in detectron2's catalogs.

Works with an official detectron2 build and with the Python-only build of
``.ci/detectron2.sh`` (there the fast COCO evaluation is unavailable, so
``COCOEvaluator(use_fast_impl=False)``: pycocotools' own COCOeval, the same numbers).
The backbone comes in as detectron2's layout of the torchvision ResNet (RGB input,
torchvision's pixel mean and std in 0..255 units, stride in the 3x3 convolution).
"""

from __future__ import annotations

import logging
import re
import socket
import sys
from pathlib import Path

import torch

from virtex import dist
from virtex.errors import UserError
from virtex.evaluation.api import EvalRequest

from .datasets import DetectionData, Instances, trainable
from .evaluate import lvis_numpy_compat
from .settings import DetectionSettings

PIXEL_MEAN = [123.675, 116.280, 103.530]  # torchvision's ImageNet mean / std, RGB, 0..255
PIXEL_STD = [58.395, 57.120, 57.375]
ZOO = {"mask_rcnn_fpn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
       "faster_rcnn_c4": "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml"}
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "wide_resnet50_2": 50}


def zoo_config(name: str) -> Path:
    """A model-zoo yaml, found without importing ``detectron2.model_zoo`` (which needs
    ``pkg_resources`` in detectron2 <= 0.6)."""
    import importlib.util

    spec = importlib.util.find_spec("detectron2.model_zoo")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "configs" / name
        if path.is_file():
            return path
    raise UserError(f"detectron2's model-zoo config {name} is not installed (a detectron2 "
                    "build without its configs/ folder): reinstall detectron2")


def d2_state(torchvision_state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict in detectron2's names: ``stem.conv1(.norm)``,
    ``res2..res5.<block>.conv<k>(.norm)``, ``shortcut(.norm)``; under ``backbone.bottom_up``
    for FPN, and for C4 ``res5`` under ``roi_heads`` (the box head)."""
    out = {}
    for key, value in torchvision_state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if key.startswith(("conv1.", "bn1.")):
            name = "stem.conv1." + ("" if key.startswith("conv1.") else "norm.") + key.split(".")[-1]
        else:
            m = re.match(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$", key)
            if m is None:
                raise UserError(f"backbone weight {key!r} is not part of a torchvision ResNet")
            stage, block, part, leaf = int(m.group(1)) + 1, m.group(2), m.group(3), m.group(4)
            part = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(
                part, part.replace("bn", "conv") + ".norm" if part.startswith("bn") else part)
            name = f"res{stage}.{block}.{part}.{leaf}"
        if arch == "mask_rcnn_fpn":
            out["backbone.bottom_up." + name] = value
        elif name.startswith("res5."):
            out["roi_heads." + name] = value
        else:
            out["backbone." + name] = value
    return out


def load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy converted backbone weights into a detectron2 model; every one must fit."""
    own = model.state_dict()
    missing = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if missing or wrong:
        raise UserError(f"the backbone does not fit the detectron2 model: "
                        f"{'; '.join((missing + wrong)[:3])}")
    model.load_state_dict(state, strict=False)


def _register_extra_norm_head() -> None:
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5 RoI head with a norm layer (``RESNETS.NORM``) after res5 (the paper's C4 head)."""

        @classmethod
        def _build_res5_block(cls, cfg):
            blocks, channels = super()._build_res5_block(cfg)
            blocks.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
            return blocks, channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def build_config(s: DetectionSettings, backbone: str, work_dir: Path, device: torch.device,
                 train_name: str, test_name: str):
    """The detectron2 config: a model-zoo base with the settings ``s`` on top."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(zoo_config(ZOO[s.arch])))
    m = cfg.MODEL
    m.WEIGHTS = ""
    m.DEVICE = device.type if device.type == "cpu" else f"cuda:{device.index or 0}"
    m.MASK_ON = s.with_masks
    cfg.INPUT.FORMAT = "RGB"
    m.PIXEL_MEAN, m.PIXEL_STD = list(PIXEL_MEAN), list(PIXEL_STD)
    m.BACKBONE.FREEZE_AT = 0
    m.RESNETS.DEPTH = DEPTHS[backbone]
    m.RESNETS.RES2_OUT_CHANNELS = 64 if DEPTHS[backbone] < 50 else 256
    m.RESNETS.WIDTH_PER_GROUP = 128 if backbone == "wide_resnet50_2" else 64
    m.RESNETS.NORM = s.norm
    m.RESNETS.STRIDE_IN_1X1 = False  # torchvision puts the stride in the 3x3 convolution
    if s.arch == "mask_rcnn_fpn":
        m.FPN.NORM = s.fpn_norm or ""
    elif s.extra_norm:
        _register_extra_norm_head()
        m.ROI_HEADS.NAME = "Res5ROIHeadsExtraNorm"
    m.ROI_HEADS.NUM_CLASSES = s.num_classes
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = s.roi_batch_size
    m.ROI_HEADS.SCORE_THRESH_TEST = s.score_thresh
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.PRE_NMS_TOPK_TEST = s.rpn_pre_nms_train, s.rpn_pre_nms_test
    m.RPN.POST_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TEST = s.rpn_post_nms_train, s.rpn_post_nms_test
    cfg.TEST.DETECTIONS_PER_IMAGE = s.detections_per_image
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(s.min_size_train)
    cfg.INPUT.MIN_SIZE_TEST = s.min_size_test
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = s.max_size
    sol = cfg.SOLVER
    sol.IMS_PER_BATCH, sol.BASE_LR, sol.MOMENTUM = s.batch_size, s.lr, s.momentum
    sol.WEIGHT_DECAY = s.weight_decay
    sol.MAX_ITER, sol.WARMUP_ITERS = s.max_steps, s.warmup_steps
    sol.STEPS = tuple(m for m in s.milestones if m < s.max_steps)  # later ones never happen
    sol.CHECKPOINT_PERIOD = s.checkpoint_every
    sol.AMP.ENABLED = s.amp == "fp16"
    cfg.TEST.PRECISE_BN.ENABLED = s.precise_bn_iters > 0
    cfg.TEST.PRECISE_BN.NUM_ITER = max(1, s.precise_bn_iters)
    cfg.TEST.EVAL_PERIOD = 0  # evaluate once, after training
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), (test_name,)
    cfg.DATALOADER.NUM_WORKERS = s.num_workers
    if s.repeat_threshold:
        cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
        cfg.DATALOADER.REPEAT_THRESHOLD = s.repeat_threshold
    cfg.OUTPUT_DIR = str(work_dir)
    cfg.freeze()
    return cfg


def _dicts(data: DetectionData, train: bool, with_masks: bool) -> list[dict]:
    """detectron2's dataset dicts (boxes XYXY_ABS, contiguous category ids)."""
    from detectron2.structures import BoxMode

    out = []
    for r in data.records:
        row = {"file_name": str(r.path), "height": r.height, "width": r.width,
               "image_id": r.name if data.kind == "voc" else r.image_id}
        if train:
            kept: Instances | None = trainable(r, with_masks)
            if kept is None:
                continue
            row["annotations"] = [
                {"bbox": [float(v) for v in kept.boxes[k]], "bbox_mode": BoxMode.XYXY_ABS,
                 "category_id": int(kept.labels[k]), "iscrowd": 0,
                 **({"segmentation": kept.polygons[k]} if with_masks and kept.polygons else {})}
                for k in range(len(kept.labels))]
        out.append(row)
    return out


def register(name: str, data: DetectionData, train: bool, with_masks: bool) -> None:
    """Register ``data`` (our reader's records) as detectron2 dataset ``name`` with the
    metadata its evaluator needs."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    dicts = _dicts(data, train, with_masks)
    DatasetCatalog.register(name, lambda: dicts)
    meta = MetadataCatalog.get(name)
    meta.thing_classes = list(data.classes)
    if data.kind == "voc":
        year = re.search(r"(20\d\d)", data.voc_root.name if data.voc_root else "")
        meta.set(evaluator_type="pascal_voc", dirname=str(data.voc_root), split=data.voc_split,
                 year=int(year.group(1)) if year else 2007)
    else:
        meta.set(evaluator_type=data.kind, json_file=str(data.annotation_file),
                 thing_dataset_id_to_contiguous_id={c: k for k, c in enumerate(data.category_ids)})


def _local_group() -> None:
    """detectron2's per-machine process group (its ``launch`` makes it; we are launched by virtex)."""
    from detectron2.utils import comm

    hosts = dist.gather_objects(socket.gethostname())
    for host in sorted(set(hosts)):
        group = torch.distributed.new_group([r for r, h in enumerate(hosts) if h == host])
        if host == hosts[dist.rank()]:
            comm._LOCAL_PROCESS_GROUP = group


def _logger(work_dir: Path, rank: int) -> None:
    """detectron2's log to ``work_dir/log.txt`` (and stdout on rank 0), once per run dir."""
    log = logging.getLogger("detectron2")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in [h for h in log.handlers if getattr(h, "_virtex", False)]:
        log.removeHandler(h)
        h.close()
    work_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(work_dir / f"log_rank{rank}.txt")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
        handlers[-1].addFilter(lambda r: not r.getMessage().startswith("Model:"))  # to the file
    for h in handlers:
        h._virtex = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter("[%(asctime)s d2] %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)


def run(ctx: EvalRequest, s: DetectionSettings, train: DetectionData, test: DetectionData,
        work_dir: Path, task: str) -> dict[str, float]:
    """Fine-tune with detectron2's DefaultTrainer (resuming from ``work_dir``) and evaluate;
    returns the evaluator's numbers (percent) under this plugin's metric names."""
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import (
        COCOEvaluator,
        DatasetEvaluator,
        DatasetEvaluators,
        LVISEvaluator,
        PascalVOCDetectionEvaluator,
    )
    from detectron2.utils import comm

    if ctx.world_size > 1 and ctx.device.type != "cuda":
        raise UserError("backend='detectron2' runs several processes only on GPUs (detectron2 "
                        "gives DistributedDataParallel device ids); use backend='torchvision' "
                        "for multi-process CPU runs")
    if s.max_steps < 1:
        raise UserError("backend='detectron2' trains at least one step: set max_steps >= 1")
    if s.amp == "bf16":
        raise UserError("backend='detectron2' supports amp='fp16' only (detectron2's AMPTrainer)")
    if s.arch == "faster_rcnn_c4" and DEPTHS[ctx.backbone.name] < 50:
        raise UserError(f"detectron2's C4 box head is a bottleneck res5: {ctx.backbone.name} "
                        "cannot be used for voc_detection with backend='detectron2' (use "
                        "resnet50 or larger, or backend='torchvision')")
    if s.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(s.cpu_threads)
    if ctx.world_size > 1:
        _local_group()
    _logger(work_dir, ctx.rank)
    key = work_dir.name
    train_name, test_name = f"virtex_{key}_train", f"virtex_{key}_test"
    register(train_name, train, True, s.with_masks)
    register(test_name, test, False, s.with_masks)
    cfg = build_config(s, ctx.backbone.name, work_dir, ctx.device, train_name, test_name)
    state = d2_state({k: v.detach().cpu() for k, v in ctx.backbone.cnn.state_dict().items()},
                     s.arch)
    tasks = ("bbox", "segm") if s.with_masks else ("bbox",)

    class Counter(DatasetEvaluator):
        """How many test images the model ran on, over all processes."""

        def reset(self):
            self.ids = []

        def process(self, inputs, outputs):
            self.ids += [x["image_id"] for x in inputs]

        def evaluate(self):
            return {"images": {"evaluated": len({i for part in comm.all_gather(self.ids)
                                                  for i in part})}}

    class Trainer(DefaultTrainer):
        @classmethod
        def build_model(cls, cfg):
            model = super().build_model(cfg)
            load_backbone(model, state)
            return model

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            out = str(work_dir / "inference")
            if train.kind == "voc":
                official = PascalVOCDetectionEvaluator(dataset_name)
            elif train.kind == "lvis":
                official = LVISEvaluator(dataset_name, tasks=tasks, output_dir=out,
                                         max_dets_per_image=s.detections_per_image)
            else:
                official = COCOEvaluator(dataset_name, tasks=tasks, output_dir=out,
                                         use_fast_impl=False)
            return DatasetEvaluators([official, Counter()])

    from detectron2.data import DatasetCatalog

    ctx.info(f"detection ({s.arch}, detectron2): {len(DatasetCatalog.get(train_name))} training "
             f"images, {s.max_steps} steps of {s.batch_size}; checkpoints in {work_dir}")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    with lvis_numpy_compat():  # evaluation runs at the end of train()
        trainer.train()
    results = dist.gather_objects(getattr(trainer, "_last_eval_results", {}) or {})[0]
    return flatten(results, train.kind)


def flatten(results: dict, kind: str) -> dict[str, float]:
    """detectron2's ``{"bbox": {"AP": ...}, "segm": {...}}`` as ``bbox_AP``, ... (VOC: ``AP``)."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl") + (("APr", "APc", "APf")
                                                          if kind == "lvis" else ())
    out = {"images": float(results.get("images", {}).get("evaluated", 0))}
    for iou_type, values in results.items():
        if iou_type == "images":
            continue
        for k in ("AP", "AP50", "AP75") if kind == "voc" else keys:
            if k in values:
                out[k if kind == "voc" else f"{iou_type}_{k}"] = float(values[k])
    return out
