"""Our model and the 'paper' decoder against the original VirTex code's outputs
(``shared/fidelity/model``: README §3): features, logits, losses, beam search and greedy."""

import json

import pytest
import torch
from fidelity import FIDELITY, needs_fidelity
from fidelity_model import EOS, SOS, load_fidelity_model

from virtex.models import decoding

pytestmark = [needs_fidelity, pytest.mark.usefixtures("one_thread")]
MODEL = FIDELITY / "model"


@pytest.fixture(scope="module")
def model():
    return load_fidelity_model()


@pytest.fixture(scope="module")
def features(model):
    with torch.no_grad():
        return model.visual(torch.load(MODEL / "images.pt"))


def reference(name: str) -> dict:
    return json.loads((MODEL / f"{name}.json").read_text())


def padded(tokens: torch.Tensor, width: int) -> list:
    """Our (..., T) tokens as lists of ``width``: the original pads finished beams with [EOS]."""
    extra = width - tokens.size(-1)
    assert extra >= 0
    return torch.nn.functional.pad(tokens, (0, extra), value=EOS).tolist()


def test_features_logits_and_losses_match_the_original(model, features):
    assert (features - torch.load(MODEL / "features.pt")).abs().max() <= 1e-4
    batch = torch.load(MODEL / "batch.pt")
    logits = torch.load(MODEL / "logits.pt")
    real = torch.arange(30)[None] < batch["caption_lengths"][:, None]  # non-padding positions
    with torch.no_grad():
        forward = model.textual(features, batch["caption_tokens"])
        backward = model.textual_backward(features, batch["noitpac_tokens"])
        out = model({"image": torch.load(MODEL / "images.pt"), **batch})
    assert (forward - logits["forward"])[real].abs().max() <= 1e-3
    assert (backward - logits["backward"])[real].abs().max() <= 1e-3
    loss = reference("loss")
    assert abs(out["loss"].item() - loss["loss_total"]) <= 1e-4
    for name in ("captioning_forward", "captioning_backward"):
        assert abs(out["losses"][name].item() - loss[name]) <= 1e-4


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_gives_the_originals_five_beams(model, features, use_cache):
    ref = reference("beam5")
    tokens, scores = decoding.paper_beams(model.textual, features, SOS, EOS, max_length=30,
                                          beam_size=5, use_cache=use_cache)
    assert padded(tokens, 30) == ref["all_beams"]["tokens"]  # every beam, in order
    assert padded(tokens[:, 0], 30) == ref["tokens"]
    assert (scores - torch.tensor(ref["all_beams"]["logprob"])).abs().max() <= 1e-2
    assert (scores[:, 0] - torch.tensor(ref["logprob"])).abs().max() <= 1e-2


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_is_the_originals_one_beam_search(model, features, use_cache):
    ref = reference("greedy")
    tokens, scores = decoding.paper_beams(model.textual, features, SOS, EOS, max_length=30,
                                          beam_size=1, use_cache=use_cache)
    assert padded(tokens[:, 0], 30) == ref["tokens"]
    assert (scores[:, 0] - torch.tensor(ref["logprob"])).abs().max() <= 1e-2


def test_generated_ids_decode_to_the_originals_text(model, features):
    """generate(decoder='paper') ids, decoded by sentencepiece as the original's
    eval_captioning.py does, are the original's caption text (two captions begin with a
    generated [SOS], which sentencepiece renders as nothing; one is empty)."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(FIDELITY / "vocab" / "golden_1k.model"))
    images = torch.load(MODEL / "images.pt")
    for name, method in (("beam5", "beam"), ("greedy", "greedy")):
        ref = reference(name)
        for use_cache in (True, False):
            ids = model.generate(images, method=method, beam_size=5, max_length=30,
                                 use_cache=use_cache, decoder="paper")
            assert [sp.decode(row) for row in ids] == ref["text"]
            assert not {SOS, EOS} & {t for row in ids for t in row}
    assert sum(row[0] == SOS for row in reference("beam5")["tokens"]) == 2
    beams = decoding.beam_search_all(model.textual, features, SOS, EOS, max_length=30,
                                     beam_size=5, decoder="paper")
    all_beams = reference("beam5")["all_beams"]["tokens"]
    assert [[sp.decode(ids) for ids, _ in row] for row in beams] == [
        [sp.decode(ids) for ids in row] for row in all_beams]
    scores = torch.tensor([[score for _, score in row] for row in beams])
    assert (scores - torch.tensor(reference("beam5")["all_beams"]["logprob"])).abs().max() <= 1e-2
