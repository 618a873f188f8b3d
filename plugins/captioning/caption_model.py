"""The captioning model an evaluator decodes with: the run's own, or one built and loaded.

A checkpoint is ours (``{"model": task state dict, ...}`` as the trainer writes it) or a
published VirTex one (``{"model": ...}`` with ``textual.transformer.layers.*`` /
``backward_textual.*`` keys), told apart by key names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from virtex import checkpoint
from virtex.errors import UserError
from virtex.evaluation.api import EvalRequest, is_captioning_model
from virtex.weights import key_mismatches, virtex_state_dict_to_ours


def _few(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _is_published(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("backward_textual.") or ".transformer.layers." in k for k in state)


def captioning_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module,
                          source: str) -> dict[str, torch.Tensor]:
    """``state`` (ours or published VirTex) checked and fitted to ``model``'s keys and shapes."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("textual.") for k in state):
        prefixes = sorted({k.split(".", 1)[0] + ".*" for k in state})
        raise UserError(f"checkpoint '{source}' is not a captioning model: it has no 'textual.*' "
                        f"weights (it has {_few(prefixes, 5) or 'no weights'})")
    tokenizer = getattr(model, "tokenizer", None)
    bias = state.get("textual.output.bias")
    if tokenizer is not None and bias is not None and bias.shape[0] != tokenizer.vocab_size:
        raise UserError(f"checkpoint '{source}' predicts {bias.shape[0]} tokens, but the "
                        f"vocabulary {tokenizer.model_path} has {tokenizer.vocab_size} pieces: "
                        "bind vocab to the vocabulary the checkpoint was trained with")
    if _is_published(state):
        try:
            return virtex_state_dict_to_ours(state, model=model)
        except ValueError as exc:
            raise UserError(f"checkpoint '{source}' (published VirTex format) does not fit the "
                            f"model: {str(exc).splitlines()[0][:400]}") from None
    own = model.state_dict()
    if not any(k.startswith("textual_backward.") for k in own):  # the backward head is unused here
        state = {k: v for k, v in state.items() if not k.startswith("textual_backward.")}
    parts = key_mismatches(state, own, "checkpoint vs model")
    if parts:
        missing = [k for k in own if k not in state]
        hint = ""
        if missing and all(k.startswith("textual_backward.") for k in missing):
            hint = " (a forward-only captioning checkpoint: use the model @tasks.captioning)"
        raise UserError(f"checkpoint '{source}' does not fit the {type(model).__name__} "
                        f"model ({'; '.join(parts)}){hint}: are the model spec's visual / "
                        "textual_size / vocab the ones it was trained with?")
    return state


def build_captioning_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` (e.g. ``tasks.bicaptioning``), checked to be able to caption."""
    model = factory()
    if not is_captioning_model(model):
        raise UserError(f"{type(model).__name__} is not a captioning model (it cannot generate "
                        "captions): use e.g. @tasks.bicaptioning or @tasks.captioning")
    return model


def load_captioning_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load checkpoint ``path`` (ours or published VirTex) into ``model``, strictly."""
    state = checkpoint.load(path)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and isinstance(state.get("vocab"), Mapping):
        tokenizer.check_fits(state["vocab"], f"checkpoint '{path}'")
    state = state.get("model", state)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint '{path}' holds no model state dict (expected "
                        "{'model': {name: tensor}} or a state dict)")
    model.load_state_dict(captioning_state_dict(state, model, str(path)))


class ModelSource:
    """Which model an evaluator captions with: the run's pretrained ``request.model`` if
    it can caption, else ``factory()`` (built once) loaded from ``request.ckpt``."""

    def __init__(self, factory: Callable[[], nn.Module] | None, evaluator: str):
        self.factory, self.evaluator = factory, evaluator
        self._model: nn.Module | None = None
        self._loaded: Path | None = None

    def __call__(self, request: EvalRequest) -> nn.Module | None:
        """The model, on ``request.device``; None when the run has neither model nor checkpoint
        (e.g. the random-init comparison of a pretraining run)."""
        if request.model is not None:
            if not is_captioning_model(request.model):
                raise UserError(f"evaluators.{self.evaluator}: this run pretrained a "
                                f"{type(request.model).__name__}, which cannot generate captions")
            return request.model
        if request.ckpt is None:
            return None
        if self.factory is None:
            raise UserError(f"evaluators.{self.evaluator}.model is not set: bind it to the task "
                            "factory the checkpoint was trained with, e.g. @tasks.bicaptioning")
        if self._model is None:
            self._model = build_captioning_model(self.factory)
        if self._loaded != Path(request.ckpt):  # each checkpoint of a sweep in turn
            load_captioning_checkpoint(self._model, request.ckpt)
            self._loaded = Path(request.ckpt)
        return self._model.to(request.device)
