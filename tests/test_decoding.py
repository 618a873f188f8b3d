"""Greedy / beam / nucleus decoding; the KV-cached path must equal the naive path exactly."""

import pytest
import torch
from virtex.plugins.models.objectives import BicaptioningModel, CaptioningModel

from virtex.models import decoding
from virtex.models.textual import TransformerTextualHead
from virtex.models.visual import ResNetBackbone

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAD, SOS, EOS = 20, 0, 2, 3
FEATURES = 32  # visual channels fed straight to the head


def random_head(seed: int, dtype=torch.float64, norm_first: bool = False, max_len: int = 20):
    """A head with weights scaled up so that random captions are varied, not constant."""
    torch.manual_seed(seed)
    head = TransformerTextualHead(
        FEATURES,
        VOCAB,
        hidden_size=64,
        num_layers=2,
        attention_heads=4,
        feedforward_size=128,
        norm_first=norm_first,
        max_caption_length=max_len,
    )
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return head.to(dtype).eval()


def features(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, FEATURES, 3, 3, generator=torch.Generator().manual_seed(seed)).to(dtype)


def both_paths(head, feats, method, **kwargs):
    cached = decoding.generate(head, feats, method, use_cache=True, **kwargs)
    naive = decoding.generate(head, feats, method, use_cache=False, **kwargs)
    return cached, naive


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_equals_naive_on_random_weights(seed, norm_first):
    head = random_head(seed, norm_first=norm_first)
    feats = features(4, seed)
    greedy, naive = both_paths(head, feats, "greedy", max_length=20)
    assert greedy == naive
    assert len({tuple(c) for c in greedy}) > 1  # not a degenerate constant model
    for beam_size in (3, 5):
        cached, naive = both_paths(head, feats, "beam", beam_size=beam_size, max_length=20)
        assert cached == naive
    # Beam size 1 is greedy search.
    assert decoding.generate(head, feats, "beam", beam_size=1, max_length=20) == greedy


def test_step_cache_logits_match_full_decoder():
    head = random_head(0)
    memory = head.encode_visual(features(3, 0))
    tokens = torch.randint(5, VOCAB, (3, 12))
    tokens[:, 0] = SOS
    cache = head.init_cache(memory)
    with torch.no_grad():
        full = head.decode(tokens, memory)
        for t in range(12):
            step = head.step(tokens[:, : t + 1], None, cache)
            assert torch.allclose(step, full[:, t], atol=1e-10, rtol=0)
    assert cache.length == 12 and cache.layers[0].buffers[0].shape == (3, 20, 1, 4, 16)


def test_beams_share_their_images_cross_attention_and_reorder_exactly():
    """Rows i*B .. i*B+B-1 (beams of image i) read image i's cross-attention keys/values,
    stored once; reordering beams mid-caption gives the logits of the reordered prefixes."""
    head, beams = random_head(1), 4
    memory = head.encode_visual(features(3, 1))
    tokens = torch.randint(5, VOCAB, (3 * beams, 8))
    expanded = memory.repeat_interleave(beams, dim=0)
    cache = head.init_cache(memory)
    assert cache.layers[0].cross_k.size(0) == 3
    # beams trade places within each image after 4 tokens (one row copied twice)
    index = torch.tensor([1, 0, 3, 3, 4, 6, 5, 7, 11, 10, 8, 9])
    reordered = torch.cat([tokens[index, :4], tokens[:, 4:]], dim=1)
    with torch.no_grad():
        full = head.decode(tokens, expanded)
        after = head.decode(reordered, expanded)
        for t in range(8):
            if t == 4:
                cache.reorder(index)
            step = head.step((reordered if t >= 4 else tokens)[:, : t + 1], None, cache)
            expected = (after if t >= 4 else full)[:, t]
            assert torch.allclose(step, expected, atol=1e-10, rtol=0), t
    with pytest.raises(ValueError, match="cache holds 20 positions, 21 were fed"):
        cache.extend(3 * beams, 13, tokens.device)


def train_head(sequences: list[list[int]], steps: int = 50) -> tuple:
    """Overfit a tiny head so that image i is captioned with sequences[i]."""
    torch.manual_seed(0)
    head = TransformerTextualHead(
        FEATURES, VOCAB, hidden_size=64, num_layers=1, attention_heads=4, dropout=0.0
    )
    feats = features(len(sequences), 7, torch.float32)
    width = max(len(s) for s in sequences) + 2
    tokens = torch.full((len(sequences), width), PAD)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq) + 2] = torch.tensor([SOS, *seq, EOS])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = head(feats, tokens)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval(), feats


def test_trained_model_reproduces_its_captions():
    sequences = [[5, 9, 9, 12, 7, 18], [11, 6, 14]]
    head, feats = train_head(sequences)
    for use_cache in (True, False):
        assert decoding.generate(head, feats, "greedy", use_cache=use_cache) == sequences
        for beam_size in (3, 5):
            kwargs = {"beam_size": beam_size, "use_cache": use_cache}
            assert decoding.generate(head, feats, "beam", **kwargs) == sequences
    # A confident model samples its caption too.
    sampled = decoding.generate(head, feats, "nucleus", top_p=0.5, generator=torch.manual_seed(0))
    assert sampled == sequences


def test_nucleus_is_deterministic_per_seed():
    head = random_head(4)
    feats = features(4, 4)

    def sample(seed, use_cache=True):
        g = torch.Generator().manual_seed(seed)
        kwargs = {"top_p": 0.9, "max_length": 20, "use_cache": use_cache, "generator": g}
        return decoding.generate(head, feats, "nucleus", **kwargs)

    assert sample(0) == sample(0)
    assert sample(0) == sample(0, use_cache=False)
    assert any(sample(0) != sample(s) for s in (1, 2, 3))
    with pytest.raises(ValueError, match="top_p"):
        decoding.generate(head, feats, "nucleus", top_p=0.0)


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
def test_lengths_and_eos(method):
    head = random_head(5, max_len=12)
    feats = features(3, 5)
    for max_length in (1, 4, 50):
        for caption in decoding.generate(head, feats, method, max_length=max_length):
            assert len(caption) <= min(max_length, 12)
            assert not {PAD, SOS, EOS} & set(caption)
    with torch.no_grad():
        head.output.bias[EOS] = 1e4  # EOS right away: empty captions
    assert decoding.generate(head, feats, method) == [[], [], []]
    with torch.no_grad():
        head.output.bias[EOS] = -1e4
        head.output.bias[7] = 1e4  # never EOS: captions run to max_length
    assert decoding.generate(head, feats, method, max_length=6) == [[7] * 6] * 3
    assert decoding.generate(head, feats, method, max_length=0) == [[], [], []]


def test_full_width_beam_finds_the_best_caption():
    """With a beam as wide as all prefixes, beam search is exhaustive: finished (short)
    beams must be kept and compared with plain summed log-probs against longer ones."""
    vocab, steps = 7, 3
    torch.manual_seed(13)
    head = TransformerTextualHead(FEATURES, vocab, hidden_size=32, attention_heads=2)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
        head.output.bias[EOS] = 1.0  # make short captions competitive
    head = head.double().eval()
    feats = features(1, 13)
    allowed = [t for t in range(vocab) if t not in (PAD, SOS)]

    def score(caption: list[int], ended: bool) -> float:
        tokens = torch.tensor([[SOS, *caption, EOS][: len(caption) + 1 + ended]])
        with torch.no_grad():
            logits = head(feats, tokens[:, :-1])
        logits[..., [PAD, SOS]] = float("-inf")
        logprobs = logits.log_softmax(-1)[0]
        return logprobs.gather(1, tokens[0, 1:, None]).sum().item()

    words = [t for t in allowed if t != EOS]
    candidates = [([], True)]
    prefixes = [[]]
    for length in range(1, steps + 1):
        prefixes = [p + [w] for p in prefixes for w in words]
        candidates += [(p, length < steps) for p in prefixes]
    best = max(candidates, key=lambda c: score(*c))[0]
    assert best == [6]  # a caption that ends early ...
    assert decoding.generate(head, feats, "greedy", max_length=steps) == [
        [6, 4, 6]
    ]  # ... unlike greedy
    for use_cache in (True, False):
        found = decoding.generate(
            head,
            feats,
            "beam",
            beam_size=len(allowed) ** (steps - 1),
            max_length=steps,
            use_cache=use_cache,
        )
        assert found == [best]


def test_model_generate_api():
    torch.manual_seed(0)
    head = TransformerTextualHead(
        512, VOCAB, hidden_size=64, attention_heads=2, max_caption_length=10
    )
    images = torch.randn(2, 3, 32, 32)
    for model in (
        CaptioningModel(ResNetBackbone("resnet18"), head),
        BicaptioningModel(ResNetBackbone("resnet18"), head),
    ):
        model.eval()
        for method in ("greedy", "beam", "nucleus"):
            captions = model.generate(images, method=method, beam_size=2, max_length=30)
            assert len(captions) == 2 and all(len(c) <= 10 for c in captions)
            assert all(isinstance(t, int) for c in captions for t in c)
        with pytest.raises(ValueError, match="unknown decoding method"):
            model.generate(images, method="sample")
        for method in ("greedy", "beam"):
            captions = model.generate(images, method=method, beam_size=2, decoder="paper")
            assert len(captions) == 2 and all(len(c) <= 30 for c in captions)


def paper_both_paths(head, feats, beam_size, max_length=20):
    cached = decoding.paper_beams(head, feats, SOS, EOS, max_length, beam_size, use_cache=True)
    naive = decoding.paper_beams(head, feats, SOS, EOS, max_length, beam_size, use_cache=False)
    return cached, naive


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm_first", [False, True])
def test_paper_cached_equals_naive_on_random_weights(seed, norm_first):
    head = random_head(seed, norm_first=norm_first)
    feats = features(4, seed)
    for beam_size in (1, 3, 5):
        (tokens, scores), (naive_tokens, naive_scores) = paper_both_paths(head, feats, beam_size)
        assert torch.equal(tokens, naive_tokens)
        assert torch.allclose(scores, naive_scores, atol=1e-9, rtol=0)
        assert len({tuple(row) for row in tokens[:, 0].tolist()}) > 1
    kwargs = {"max_length": 20, "sos_idx": SOS, "eos_idx": EOS, "decoder": "paper"}
    for method in ("greedy", "beam"):
        cached, naive = both_paths(head, feats, method, **kwargs)
        assert cached == naive
    assert decoding.generate(head, feats, "beam", beam_size=1, **kwargs) == \
        decoding.generate(head, feats, "greedy", **kwargs)


def test_paper_scores_are_sums_of_the_originals_step_log_probs():
    """Score = log p(y1 | [SOS]) + sum over t of log p(y_t | y_1..y_t-1 fed WITHOUT [SOS]),
    up to and including the first [EOS]; no length normalisation."""
    head, feats = random_head(6), features(3, 6)
    with torch.no_grad():
        head.output.bias[EOS] = 2.0  # some beams end early
        memory = head.encode_visual(feats)
        beams = decoding.beam_search_all(head, feats, SOS, EOS, max_length=10, beam_size=4,
                                         decoder="paper")
        ended = 0
        for i, row in enumerate(beams):
            assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)
            tokens, _ = decoding.paper_beams(head, feats[i: i + 1], SOS, EOS, 10, 4)
            for (ids, score), full in zip(row, tokens[0].tolist()):
                full = full[: full.index(EOS) + 1] if EOS in full else full
                ended += full[-1] == EOS
                expected = head.decode(torch.tensor([[SOS]]), memory[i: i + 1])[0, 0]
                total = expected.log_softmax(-1)[full[0]].item()
                for t in range(1, len(full)):
                    prefix = torch.tensor([full[:t]])
                    logits = head.decode(prefix, memory[i: i + 1], mask_padding=False)[0, -1]
                    total += logits.log_softmax(-1)[full[t]].item()
                assert score == pytest.approx(total, abs=1e-9)
                assert ids == [t for t in full if t not in (SOS, EOS)]
    assert 0 < ended < 12


def test_paper_rules_differ_from_the_standard_decoder():
    head, feats = random_head(5, max_len=12), features(3, 5)
    kwargs = {"sos_idx": SOS, "eos_idx": EOS, "max_length": 6}
    with torch.no_grad():
        head.output.bias[EOS] = 1e4  # [EOS] first: empty captions
    assert decoding.generate(head, feats, "beam", decoder="paper", **kwargs) == [[], [], []]
    with torch.no_grad():
        head.output.bias[EOS] = -1e4
        head.output.bias[7] = 1e4
    assert decoding.generate(head, feats, "beam", **kwargs) == [[7] * 6] * 3
    for method in ("greedy", "beam"):  # the token just produced gets -10000: no repeats
        for caption in decoding.generate(head, feats, method, decoder="paper", **kwargs):
            assert len(caption) == 6 and caption.count(7) == 3
            assert all(a != b for a, b in zip(caption, caption[1:]))
    with torch.no_grad():
        head.output.bias[7] = 0.0
        head.output.bias[SOS] = 1e4  # nothing is forbidden at step 1
        tokens, _ = decoding.paper_beams(head, feats, SOS, EOS, max_length=6, beam_size=1)
    assert tokens[:, 0, 0].tolist() == [SOS] * 3
    with torch.no_grad():
        head.output.bias[SOS] = 0.0
        head.output.bias[PAD] = 1e4  # padding id generated, then attended (not masked)
    (tokens, scores), (naive, naive_scores) = paper_both_paths(head, feats, 3, max_length=8)
    assert (tokens == PAD).any() and torch.equal(tokens, naive)
    assert torch.isfinite(scores).all() and torch.allclose(scores, naive_scores)


def test_paper_decoder_options():
    head, feats = random_head(0), features(2, 0)
    with pytest.raises(ValueError, match="exists only for decoder 'standard'"):
        decoding.generate(head, feats, "nucleus", decoder="paper")
    with pytest.raises(ValueError, match="unknown decoder 'orig'"):
        decoding.generate(head, feats, "beam", decoder="orig")
    with pytest.raises(ValueError, match="unknown decoder"):
        decoding.beam_search_all(head, feats, decoder="orig")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cached_equals_naive_on_cuda_and_matches_the_cpu(method):
    head, feats = random_head(0), features(8, 0)
    on_cpu = decoding.generate(head, feats, method, max_length=20)
    cached, naive = both_paths(head.cuda(), feats.cuda(), method, max_length=20)
    assert cached == naive == on_cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("beam_size", [1, 5])
def test_paper_cached_equals_naive_on_cuda_and_matches_the_cpu(beam_size):
    head, feats = random_head(0), features(8, 0)
    on_cpu, _ = decoding.paper_beams(head, feats, SOS, EOS, 20, beam_size)
    (cached, _), (naive, _) = paper_both_paths(head.cuda(), feats.cuda(), beam_size)
    assert torch.equal(cached.cpu(), naive.cpu())
    assert torch.equal(cached.cpu(), on_cpu)
