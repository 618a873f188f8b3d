"""Published VirTex checkpoints by name: ``--gin_param ckpt=zoo:bicaptioning_R_50_L1_H2048``.

The names, files and the architecture each checkpoint needs are data (``zoo.json``, the
original model zoo). Naming ``zoo:NAME`` is the explicit opt-in to a download: the file is
fetched then, once, with a progress bar, into torch hub's cache (``$TORCH_HOME/hub/
checkpoints``), and checked to be a checkpoint before it takes its final name. Nothing else
downloads. ``VIRTEX_ZOO_URL`` points at a mirror that holds the files as ``NAME.pth``.

:func:`expand_params` is what the CLI calls: a binding ``X=zoo:NAME`` becomes the local
path, and the spec's model macros (``backbone``, ``visual``, ``textual_size``) that it
defines are bound to the checkpoint's architecture.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from virtex.errors import UserError

PREFIX = "zoo:"
_ZOO_VALUE = re.compile(r"""^(?P<key>[^=]+)=\s*(?P<q>['"]?)zoo:(?P<name>[\w.-]*)(?P=q)\s*$""")


@dataclass(frozen=True)
class ZooModel:
    """One published checkpoint and what it needs to be built."""

    name: str
    task: str             # tasks.<task>
    backbone: str         # backbones.<backbone>
    textual_size: str | None
    file: str             # file name under the zoo's base URL
    voc07_mAP: float      # as reported by the original model zoo
    imagenet_top1: float

    @property
    def url(self) -> str:
        mirror = os.environ.get("VIRTEX_ZOO_URL")
        if mirror:
            return f"{mirror.rstrip('/')}/{self.name}.pth"
        return f"{_table()['base_url']}/{self.file}"

    @property
    def path(self) -> Path:
        """Where the download lives (it exists once downloaded)."""
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / f"virtex-{self.name}.pth"


@cache
def _table() -> dict:
    return json.loads((Path(__file__).with_name("zoo.json")).read_text())


def models() -> dict[str, ZooModel]:
    """Every published model by name."""
    return {name: ZooModel(name=name, **fields) for name, fields in _table()["models"].items()}


def best() -> ZooModel:
    """The paper's best model (the one the original's one-line ``torch.hub.load`` gives)."""
    return models()[_table()["best"]]


def get(name: str) -> ZooModel:
    """The model called ``name`` (with or without ``zoo:``); a clear error if unknown."""
    from virtex.registry import unknown_name_message

    name = name.removeprefix(PREFIX)
    table = models()
    if name not in table:
        raise UserError(unknown_name_message("zoo model", name, sorted(table)))
    return table[name]


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:15].lower().startswith((b"<!doctype", b"<html", b"<head", b"<?xml"))


def _check_checkpoint(path: Path, url: str) -> None:
    import torch

    with open(path, "rb") as f:  # the start only: a checkpoint is hundreds of MB
        head = f.read(512)
    if _looks_like_html(head):
        raise UserError(f"zoo download {url} returned a web page, not a checkpoint "
                        "(the link may have moved)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means not a whole checkpoint
        raise UserError(f"zoo download {url} is not a complete checkpoint "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict):
        raise UserError(f"zoo download {url} holds a {type(state).__name__}, not a checkpoint")


def fetch(name: str, progress: bool = True) -> Path:
    """The local file of zoo model ``name``, downloaded first if it is not in the cache.

    The download goes to a temporary name beside the cache file and is renamed only after
    it loads as a checkpoint (``weights_only``); any failure (offline, an HTTP error, a web
    page instead of the file, a truncated transfer) is one error with the URL and where to
    put the file by hand, and leaves nothing behind.
    """
    import torch

    from virtex import io

    model = get(name)
    target = model.path
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url, tmp = model.url, io.temporary_path(target)
    by_hand = f"download it by hand and save it as {target}"
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=progress)
        _check_checkpoint(tmp, url)
        os.replace(tmp, target)
    except UserError as exc:
        raise UserError(f"{exc}; {by_hand}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise UserError(f"zoo model {model.name}: cannot download {url} ({reason}); "
                        f"{by_hand} (or set VIRTEX_ZOO_URL to a mirror)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def zoo_name(param: str) -> tuple[str, str] | None:
    """``(key, name)`` for a ``KEY=zoo:NAME`` binding (quoted or not), else None."""
    m = _ZOO_VALUE.match(param)
    return (m["key"].strip(), m["name"]) if m else None


# The spec macros a zoo checkpoint sets, when the spec defines them.
def _settings(model: ZooModel) -> dict[str, str]:
    settings = {"backbone": f"@backbones.{model.backbone}",
                "visual": f"@backbones.{model.backbone}()"}
    if model.textual_size:
        settings["textual_size"] = repr(model.textual_size)
    return settings


def expand_params(params: Sequence[str], macros: Mapping[str, str],
                  fetch_file: Callable[[str], Path] = fetch) -> list[str]:
    """``params`` with each ``KEY=zoo:NAME`` replaced by ``KEY='<local file>'`` (fetched now)
    and, after them, bindings of the model macros the spec defines (``macros``: name ->
    value as gin writes it) to the checkpoint's architecture; a binding the user gave wins.
    A spec whose ``task`` is another pretraining task than the checkpoint's is an error."""
    defines = macros.__contains__
    out, extra = [], []
    given = {p.split("=", 1)[0].strip() for p in params if "=" in p}
    for param in params:
        found = zoo_name(param)
        if found is None:
            out.append(param)
            continue
        key, name = found
        model = get(name)
        if model.textual_size is None and defines("textual_size"):
            raise UserError(f"{key}=zoo:{name}: a {model.task} model has no textual head, and "
                            "this spec needs one (it binds textual_size); choose a "
                            "captioning model of the zoo (python -m virtex.run --list)")
        task = macros.get("task")
        if task is not None and task != f"@tasks.{model.task}" and "task" not in given:
            raise UserError(f"{key}=zoo:{name} is a tasks.{model.task} model, but this spec "
                            f"builds {task.lstrip('@')}; bind task=@tasks.{model.task} with "
                            f"its model spec (specs/models/{model.task}.gin) or choose a "
                            f"{task.lstrip('@').removeprefix('tasks.')} model of the zoo")
        out.append(f"{key}={str(fetch_file(name))!r}")
        for macro, value in _settings(model).items():
            if macro not in given and defines(macro):
                extra.append(f"{macro}={value}")
    return out + extra


def describe() -> list[str]:
    """One line per model for ``--list``: the name and the architecture it needs."""
    lines = []
    for m in models().values():
        head = f", head {m.textual_size}" if m.textual_size else ""
        lines.append(f"zoo:{m.name:<32} tasks.{m.task}, backbones.{m.backbone}{head} "
                     f"(VOC07 {m.voc07_mAP}, ImageNet {m.imagenet_top1})")
    return lines
