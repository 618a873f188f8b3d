"""The training hook ``train_hooks.sample_captions``: a trainer with ``sample_dataset``
captions its first ``num_samples`` images at every checkpoint, to tensorboard."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from virtex.context import Context
from virtex.data.source import SampleSeeded
from virtex.engine import Trainer, TrainState
from virtex.evaluation.api import is_captioning_model
from virtex.train_hooks import Hook


class SampleCaptions(Hook):
    """At every checkpoint (rank 0), caption the first ``num_samples`` images of
    ``dataset`` with beam search (no RNG is drawn) and log them as text under
    ``{prefix}captions/samples``. Models that do not caption are skipped."""

    def __init__(self, dataset: Dataset, num_samples: int, ctx: Context, prefix: str = ""):
        self.dataset, self.num_samples, self.ctx, self.prefix = dataset, num_samples, ctx, prefix

    @torch.no_grad()
    def on_checkpoint(self, state: TrainState) -> None:
        model = state.model
        if self.ctx.rank != 0 or not is_captioning_model(model):
            return
        items = [SampleSeeded(self.dataset)[(i, i)]
                 for i in range(min(self.num_samples, len(self.dataset)))]  # type: ignore[arg-type]
        images = torch.stack([item["image"] for item in items]).to(self.ctx.device)
        model.eval()
        try:
            tokens = model.generate(images, method="beam", beam_size=5, decoder="paper")
        finally:
            model.train()
        lines = [f"{int(item.get('image_id', i))}: {model.tokenizer.decode(t)}"
                 for i, (item, t) in enumerate(zip(items, tokens))]
        self.ctx.logger.text(f"{self.prefix}captions/samples", "  \n".join(lines), state.step)


def sample_captions(trainer: Trainer, ctx: Context) -> SampleCaptions | None:
    """The hook for a trainer with ``sample_dataset`` (``trainer.sample_dataset``,
    ``trainer.num_samples``); None without one."""
    if trainer.sample_dataset is None:
        return None
    return SampleCaptions(trainer.sample_dataset, trainer.num_samples, ctx, trainer.log_prefix)
