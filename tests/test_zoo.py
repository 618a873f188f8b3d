"""Published checkpoints by name (``zoo:NAME``), downloaded from a local HTTP server on
127.0.0.1 through torch.hub's real download path: once, into $TORCH_HOME, and only when
named; a 404, a web page and a truncated transfer are each one clear error that leaves
nothing behind."""

from __future__ import annotations

import importlib.util
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from cli import REPO, run_cli

from virtex import zoo
from virtex.errors import UserError
from virtex.models.visual import ResNetBackbone
from virtex.run import main

pytestmark = pytest.mark.usefixtures("private_cache")


class Server:
    """Files by URL path; ``truncate`` paths announce their length and send half."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.html: set[str] = set()
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                kind = "text/html" if self.path in server.html else "application/octet-stream"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in server.truncate else body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/zoo"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    s = Server()
    monkeypatch.setenv("VIRTEX_ZOO_URL", s.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def r50_checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A published-layout checkpoint of a (random) ResNet-50: ``{"model": visual.cnn.*}``."""
    torch.manual_seed(3)
    cnn = ResNetBackbone("resnet50").cnn.state_dict()
    buffer = io.BytesIO()
    torch.save({"model": {f"visual.cnn.{k}": v for k, v in cnn.items()}}, buffer)
    return buffer.getvalue(), cnn


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_names_cover_the_original_zoo_with_their_architectures():
    models = zoo.models()
    assert len(models) == 12 and zoo.best().name == "bicaptioning_R_50_L1_H2048"
    r101 = models["bicaptioning_R_101_L1_H1024"]
    assert (r101.backbone, r101.textual_size, r101.task) == ("resnet101", "L1_H1024_A16_F4096",
                                                             "bicaptioning")
    assert models["bicaptioning_R_50W2X_L1_H1024"].backbone == "wide_resnet50_2"
    assert models["token_classification_R_50"].textual_size is None
    for m in models.values():  # L<layers>_H<width>_A<width/64>_F<4 width>, as the paper
        if m.textual_size:
            layers, width, heads, ff = (int(p[1:]) for p in m.textual_size.split("_"))
            assert f"_L{layers}_H{width}" in m.name and heads * 64 == width and ff == 4 * width
    with pytest.raises(UserError, match="Did you mean: bicaptioning_R_50_L1_H2048"):
        zoo.get("zoo:bicaptioning_R50_L1_H2048")


def test_downloads_once_into_torch_home_and_loads(server, r50_checkpoint, tmp_path):
    body, cnn = r50_checkpoint
    server.files["/zoo/bicaptioning_R_50_L1_H512.pth"] = body
    path = zoo.fetch("zoo:bicaptioning_R_50_L1_H512", progress=False)
    assert path == _cache(tmp_path) / "virtex-bicaptioning_R_50_L1_H512.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert torch.equal(state["visual.cnn.conv1.weight"], cnn["conv1.weight"])
    assert zoo.fetch("bicaptioning_R_50_L1_H512", progress=False) == path
    assert server.requests == ["/zoo/bicaptioning_R_50_L1_H512.pth"]  # the second: cached
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("failure, message", [
    ("missing", r"\(HTTP 404 Not Found\)"),
    ("html", "returned a web page"),
    ("truncated", "cannot download|not a complete checkpoint"),
])
def test_a_failed_download_is_one_error_and_leaves_nothing(server, r50_checkpoint, tmp_path,
                                                            failure, message):
    url_path = "/zoo/bicaptioning_R_50_L1_H768.pth"
    if failure == "html":
        server.files[url_path] = b"<!DOCTYPE html>\n<html><body>This file has moved</body></html>"
        server.html.add(url_path)
    elif failure == "truncated":
        server.files[url_path] = r50_checkpoint[0]
        server.truncate.add(url_path)
    with pytest.raises(UserError, match=message) as info:
        zoo.fetch("bicaptioning_R_50_L1_H768", progress=False)
    text = str(info.value)
    target = _cache(tmp_path) / "virtex-bicaptioning_R_50_L1_H768.pth"
    assert f"{server.url}/bicaptioning_R_50_L1_H768.pth" in text and str(target) in text
    assert not target.parent.is_dir() or list(target.parent.iterdir()) == []


def test_offline_is_one_error_naming_the_url(server, monkeypatch, tmp_path):
    server.close()  # nothing listens there any more
    with pytest.raises(UserError, match="cannot download .*by hand") as info:
        zoo.fetch("captioning_R_50_L1_H2048", progress=False)
    assert server.url in str(info.value)


def _voc07_args(shapes_root: Path, run_dir: Path, *params: str) -> list[str]:
    out = ["downstream/voc07", "--run_dir", str(run_dir)]
    for p in [f"data_root={shapes_root / 'VOC2007'}", "image_size=32", "resize=37",
              "num_workers=0", *params]:
        out += ["--gin_param", p]
    return out


def test_voc07_on_a_zoo_checkpoint_takes_its_architecture(server, r50_checkpoint, shapes_root,
                                                         tmp_path):
    server.files["/zoo/bicaptioning_R_50_L1_H512.pth"] = r50_checkpoint[0]
    run = tmp_path / "run"
    assert main(_voc07_args(shapes_root, run, "ckpt=zoo:bicaptioning_R_50_L1_H512")) == 0
    config = (run / "config.gin").read_text()
    assert "backbone = @backbones.resnet50" in config
    assert "virtex-bicaptioning_R_50_L1_H512.pth" in config
    assert "zoo:bicaptioning_R_50_L1_H512" in (run / "command.txt").read_text()
    assert 0 < json.loads((run / "metrics.json").read_text())["voc07/mAP"] <= 100


def test_print_config_binds_the_named_models_settings(server, shapes_root, tmp_path, capsys):
    for name in ("bicaptioning_R_101_L1_H1024", "bicaptioning_R_50_L2_H1024"):
        buffer = io.BytesIO()
        torch.save({"model": {}}, buffer)
        server.files[f"/zoo/{name}.pth"] = buffer.getvalue()
    args = _voc07_args(shapes_root, tmp_path / "a", "ckpt=zoo:bicaptioning_R_101_L1_H1024")
    assert main([*args, "--print_config"]) == 0
    assert "backbone = @backbones.resnet101" in capsys.readouterr().out
    # a binding the user gives wins over the zoo's
    args = _voc07_args(shapes_root, tmp_path / "b", "ckpt='zoo:bicaptioning_R_101_L1_H1024'",
                       "backbone=@backbones.resnet18")
    assert main([*args, "--print_config"]) == 0
    assert "backbone = @backbones.resnet18" in capsys.readouterr().out
    caption = ["inference/caption_folder", "--print_config", "--gin_param", f"images={tmp_path}",
               "--gin_param", "ckpt=zoo:bicaptioning_R_50_L2_H1024"]
    assert main(caption) == 0
    out = capsys.readouterr().out
    assert "textual_size = 'L2_H1024_A16_F4096'" in out and "visual = @backbones.resnet50()" in out


def test_a_model_without_a_textual_head_cannot_caption(server, tmp_path):
    res = run_cli("inference/caption_folder", "--gin_param", f"images={tmp_path}",
                  "--gin_param", "ckpt=zoo:token_classification_R_50",
                  env={"VIRTEX_ZOO_URL": server.url, "TORCH_HOME": str(tmp_path / "th")})
    assert res.returncode == 2, res.stderr
    assert "token_classification model has no textual head" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and server.requests == []
    res = run_cli("inference/caption_folder", "--gin_param", f"images={tmp_path}",
                  "--gin_param", "ckpt=zoo:captioning_R_50_L1_H2048",
                  env={"VIRTEX_ZOO_URL": server.url, "TORCH_HOME": str(tmp_path / "th")})
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "is a tasks.captioning model, but this spec builds tasks.bicaptioning" in res.stderr
    assert server.requests == []  # nothing downloaded for a run that cannot use it


def test_list_shows_every_zoo_name_with_its_architecture():
    res = run_cli("--list")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip().startswith("zoo:")]
    assert len(lines) == 12
    assert any("zoo:bicaptioning_R_101_L1_H1024" in line and "backbones.resnet101" in line
               and "L1_H1024_A16_F4096" in line for line in lines)


def test_hub_pretrained_gives_the_published_backbone(server, r50_checkpoint, tmp_path):
    body, cnn = r50_checkpoint
    server.files["/zoo/bicaptioning_R_50_L1_H2048.pth"] = body
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    model = hubconf.resnet50(pretrained=True, progress=False)
    assert torch.equal(model.state_dict()["layer4.2.conv3.weight"], cnn["layer4.2.conv3.weight"])
    assert isinstance(model.fc, torch.nn.Identity)
    # the same cache file as ckpt=zoo:NAME: the second use downloads nothing
    assert zoo.fetch("bicaptioning_R_50_L1_H2048", progress=False).is_file()
    assert server.requests == ["/zoo/bicaptioning_R_50_L1_H2048.pth"]
