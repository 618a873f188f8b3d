"""Captions for any folder (specs/inference/caption_folder.gin): captions.json, the HTML
gallery (rendered in headless Chromium), skipped files, all beams with scores."""

from __future__ import annotations

import functools
import html
import json
import re
from pathlib import Path

import pytest
import torch
from browser import chromium, probed_dom
from cli import REPO
from PIL import Image
from virtex.plugins.captioning.gallery import render_gallery

from virtex.models.decoding import beam_search_all
from virtex.models.visual import ResNetBackbone
from virtex.run import main

SPEC = str(REPO / "specs" / "inference" / "caption_folder.gin")
GOOD = ["a photo.jpg", "b.png", "c.webp"]
BAD = {"notes.txt": "not a JPEG, PNG or WebP file", "truncated.jpg": "truncated",
       "fake.jpg": "cannot identify image file"}


def tiny_model(captions: Path):
    from virtex.plugins.data import tokenizer
    from virtex.plugins.models import bicaptioning, transformer

    tok = tokenizer(model=None, captions=str(captions), vocab_size=300)
    return bicaptioning(visual=ResNetBackbone("resnet18"), tokenizer=tok,
                        textual=functools.partial(transformer, size="L1_H64_A2_F128"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shapes_root):
    """A random-weight tiny bicaptioning checkpoint and a folder of good and bad files."""
    tmp = tmp_path_factory.mktemp("caption_folder")
    captions = shapes_root / "coco" / "annotations" / "captions_train2017.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIRTEX_CACHE", str(tmp / "cache"))
        torch.manual_seed(0)
        torch.save({"model": tiny_model(captions).state_dict()}, tmp / "tiny.pt")
    folder = tmp / "images"
    (folder / "sub").mkdir(parents=True)
    sources = sorted((shapes_root / "coco" / "val2017").glob("*.jpg"))
    for name, source in zip([*GOOD, "sub/d.JPG"], sources):
        Image.open(source).convert("RGB").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    data = (folder / "a photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "fake.jpg").write_text("this is text, not a JPEG")
    (folder / ".hidden.jpg").write_text("hidden files are not looked at")
    yield {"tmp": tmp, "captions": captions, "ckpt": tmp / "tiny.pt", "folder": folder}
    torch.set_num_threads(threads)


def caption_folder(setup: dict, run_dir: Path, *params: str) -> int:
    bindings = ["tokenizer.model=None", f"tokenizer.captions={setup['captions']}",
                "tokenizer.vocab_size=300", "visual=@backbones.resnet18()",
                "experiment.backbone=@backbones.resnet18", "textual_size='L1_H64_A2_F128'",
                "evaluators.caption_folder.image_size=32", "evaluators.caption_folder.resize=32",
                "evaluators.caption_folder.num_workers=0", "evaluators.caption_folder.batch_size=2",
                f"ckpt={setup['ckpt']}", f"images={setup['folder']}", *params]
    return main([SPEC, "--run_dir", str(run_dir), *[a for b in bindings for a in ("--gin_param", b)]])


@pytest.fixture(scope="module")
def gallery_run(setup):
    run = setup["tmp"] / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIRTEX_CACHE", str(setup["tmp"] / "cache"))
        assert caption_folder(setup, run, "evaluators.caption_folder.all_beams=True") == 0
    return run


def test_good_images_are_captioned_and_bad_files_reported(gallery_run):
    rows = json.loads((gallery_run / "captions.json").read_text())
    assert [r["filename"] for r in rows] == GOOD  # sorted; sub/ is not searched by default
    for row in rows:
        assert isinstance(row["caption"], str)
        scores = [b["score"] for b in row["beams"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert row["beams"][0]["caption"] == row["caption"]
    log = (gallery_run / "log.txt").read_text()
    for name, reason in BAD.items():
        lines = [line for line in log.splitlines() if f"skipped {name}:" in line]
        assert len(lines) == 1 and reason in lines[0], (name, lines)
    assert ".hidden.jpg" not in log
    assert "1 subfolder(s)" in log
    metrics = json.loads((gallery_run / "metrics.json").read_text())
    assert metrics == {"caption_folder/images": 3.0, "caption_folder/skipped": 3.0}

    page = (gallery_run / "captions.html").read_text()
    assert len(re.findall(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]+"', page)) == 3
    for row in rows:
        assert html.escape(row["caption"]) in page and html.escape(row["filename"]) in page
    assert all(name in page for name in BAD)


def test_recursive_run_with_an_output_path(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTEX_CACHE", str(setup["tmp"] / "cache"))
    out = tmp_path / "out" / "shapes.json"
    assert caption_folder(setup, tmp_path / "run", "evaluators.caption_folder.recursive=True",
                          f"evaluators.caption_folder.output='{out}'") == 0
    rows = json.loads(out.read_text())
    assert [r["filename"] for r in rows] == [*GOOD, "sub/d.JPG"]
    assert all(set(r) == {"filename", "caption"} for r in rows)
    assert out.with_suffix(".html").is_file()
    assert not (tmp_path / "run" / "captions.json").exists()


def test_missing_folder_is_a_user_error(setup, tmp_path, capfd):
    params = [f"images={tmp_path / 'nope'}"]
    assert caption_folder({**setup, "folder": tmp_path / "nope"}, tmp_path / "run", *params) == 2
    assert f"'{tmp_path / 'nope'}' is not a folder" in capfd.readouterr().err


@pytest.mark.parametrize(("params", "message"), [
    (["evaluators.caption_folder.decoder='orig'"],
     "evaluators.caption_folder.decoder = 'orig': expected one of paper, standard"),
    (["evaluators.caption_folder.method='nucleus'"],
     "evaluators.caption_folder.method = 'nucleus' needs decoder = 'standard'"),
])
def test_bad_decoding_options_are_user_errors(setup, tmp_path, capfd, params, message):
    assert caption_folder(setup, tmp_path / "run", *params) == 2
    assert message in capfd.readouterr().err


def test_best_of_all_beams_is_the_generated_caption_and_scores_are_log_probs(setup, monkeypatch):
    monkeypatch.setenv("VIRTEX_CACHE", str(setup["tmp"] / "cache"))
    torch.manual_seed(1)
    model = tiny_model(setup["captions"]).eval()
    with torch.no_grad():  # random weights give flat distributions: sharpen them
        model.textual.output.bias.copy_(torch.randn(model.textual.vocab_size) * 3)
    images = torch.randn(4, 3, 32, 32)
    expected = model.generate(images, method="beam", beam_size=3, max_length=12)
    beams = beam_search_all(model.textual, model.visual(images), model.sos_idx, model.eos_idx,
                            max_length=12, beam_size=3)
    assert [row[0][0] for row in beams] == expected
    with torch.no_grad():
        memory = model.textual.encode_visual(model.visual(images))
        for i, row in enumerate(beams):
            for ids, score in row:
                full = [model.sos_idx, *ids] + ([model.eos_idx] if len(ids) < 12 else [])
                tokens = torch.tensor([full])
                logits = model.textual.decode(tokens, memory[i: i + 1])[0, :-1]
                logits[:, [model.textual.padding_idx, model.sos_idx]] = float("-inf")
                logprob = logits.log_softmax(-1).gather(1, tokens[0, 1:, None]).sum()
                assert score == pytest.approx(logprob.item(), abs=1e-4)


def test_gallery_escapes_text():
    page = render_gallery([{"filename": "<b>x.jpg", "caption": "<script>alert(1)</script> & co",
                            "thumbnail": "data:image/jpeg;base64,AAAA"}],
                          skipped=[("<i>.txt", "bad & wrong")])
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "&lt;b&gt;x.jpg" in page and "&lt;i&gt;.txt: bad &amp; wrong" in page




@pytest.mark.requires("chromium", how="install Chromium (apt-get install -y chromium) to run "
                                     "the gallery rendering test")
def test_browser_chromium_shows_images_beside_captions(gallery_run, tmp_path):
    """BROWSER TEST: renders captions.html in headless Chromium (``chromium`` on PATH)."""
    dom = probed_dom(gallery_run / "captions.html", tmp_path / "profile")
    assert 'data-probed="3"' in dom, dom[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == 3 and all(w > 0 for w in widths)
    rows = json.loads((gallery_run / "captions.json").read_text())
    for row in rows:
        assert html.escape(row["caption"], quote=False) in dom

    shot = tmp_path / "gallery.png"
    chromium(tmp_path / "profile", f"--screenshot={shot}", (gallery_run / "captions.html").as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        assert len(image.convert("RGB").resize((120, 90)).getcolors(20000)) > 50  # not blank


def test_checkpoint_of_another_vocabulary_is_one_error(setup, tmp_path, capfd, monkeypatch):
    """A checkpoint records its vocabulary; captioning it with another is one clear error."""
    monkeypatch.setenv("VIRTEX_CACHE", str(setup["tmp"] / "cache"))
    state = torch.load(setup["ckpt"], weights_only=True)
    other = {"pieces": 10000, "file": "coco_10k.model",
             "special_ids": {"pad": 0, "unk": 0, "sos": 1, "eos": 2, "mask": 3}}
    torch.save({**state, "vocab": other}, tmp_path / "other.pt")
    assert caption_folder(setup, tmp_path / "run", f"ckpt={tmp_path / 'other.pt'}") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("virtex: error: checkpoint ")
    assert "trained with the vocabulary coco_10k.model (10000 pieces" in err[0]
    assert "(300 pieces, special ids {'pad': 0, 'unk': 0, 'sos': 1, 'eos': 2" in err[0]
    # Without a record (a published checkpoint), the output layer's size is checked.
    sd = {k: v for k, v in state["model"].items()}
    sd["textual.output.bias"] = torch.zeros(1000)
    torch.save({"model": sd}, tmp_path / "published.pt")
    assert caption_folder(setup, tmp_path / "run2", f"ckpt={tmp_path / 'published.pt'}") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predicts 1000 tokens, but the vocabulary" in err[0]
    assert "has 300 pieces" in err[0]


def test_a_killed_caption_run_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    """Captions are journalled as they are made: what a killed run wrote is not redone
    (here a journal line with a caption no model would write), a torn last line is
    ignored, and the journal goes once captions.json is written."""
    monkeypatch.setenv("VIRTEX_CACHE", str(setup["tmp"] / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "captions.partial.0.jsonl").write_text(
        json.dumps({"filename": "b.png", "caption": "written before the kill",
                    "thumbnail": None}) + "\n" + '{"filename": "c.we')
    assert caption_folder(setup, run) == 0
    rows = {r["filename"]: r["caption"] for r in json.loads((run / "captions.json").read_text())}
    assert rows["b.png"] == "written before the kill"
    assert sorted(rows) == ["a photo.jpg", "b.png", "c.webp"]
    assert not list(run.glob("captions.partial.*"))


def test_an_unwritable_output_fails_before_the_work(setup, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("VIRTEX_CACHE", str(setup["tmp"] / "cache"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "captions.json"
    code = caption_folder(setup, tmp_path / "run", f"evaluators.caption_folder.output='{out}'")
    assert code == 2
    err = capfd.readouterr()
    assert (f"virtex: error: cannot write {blocker / '.captions.json.probe'}: {blocker} is not "
            "a directory") in err.err
    assert "captioned" not in err.out  # nothing was captioned
