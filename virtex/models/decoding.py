"""Caption decoding for a :class:`TransformerTextualHead`: greedy, beam search, nucleus.

:func:`beam_search_all` also returns the other beams and their scores (for alternative
captions). Greedy, beam and nucleus decoding take ``use_cache``: True decodes
incrementally (see :class:`~virtex.models.textual.KVCache`: each image's cross-attention
keys/values are computed once and read by all its beams, and a beam reorder moves no
keys), False re-runs the whole decoder over the whole prefix at every step. Both paths feed the
same tokens and make the same choices, so given equal logits they give equal captions
(tests check this exactly in float64). Call ``model.eval()`` first: dropout would make
decoding random.

Two decoders (``decoder=``):

- ``"standard"`` (ours): generation starts from ``[SOS]``, which stays in the decoder's
  input; ``[PAD]`` and ``[SOS]`` are never generated; a sequence stops at ``[EOS]``; at most
  ``max_length`` tokens are generated (also capped by the head's ``max_caption_length``
  positions). Greedy, beam and nucleus.
- ``"paper"``: the original VirTex beam search, see :func:`paper_beams`. Beam and greedy
  (= that search with one beam).

Results are token ids without ``[SOS]``/``[EOS]``.
"""

from __future__ import annotations

import torch

from virtex.models.textual import KVCache, TransformerTextualHead

METHODS = ("greedy", "beam", "nucleus")
DECODERS = ("paper", "standard")
PAPER_METHODS = ("greedy", "beam")
# The original's search: each beam proposes its best 2 next tokens; the token a beam has
# just produced gets this log-probability at its next step.
PER_NODE_BEAM_SIZE = 2
REPEAT_LOGPROB = -10000.0
# Asking whether every caption has finished makes the host wait for the device; asking every
# few steps lets a GPU queue steps ahead. Finished captions only append [PAD], so the extra
# steps change nothing.
STOP_CHECK_EVERY = 4
# Rows of next-token log-probs handled at once on a CPU: 32 x 10k floats stay in L2.
CPU_CHUNK_ROWS = 32


class _Stepper:
    """Next-token logits for a growing batch of prefixes, with or without a KV cache;
    ``forbidden`` token ids get -inf (never generated)."""

    def __init__(self, head: TransformerTextualHead, memory: torch.Tensor, use_cache: bool,
                 forbidden: tuple[int, ...]):
        self.head = head
        self.memory = memory
        self.cache: KVCache | None = head.init_cache(memory) if use_cache else None
        self.forbidden = forbidden
        self.bias: torch.Tensor | None = None  # made at the first step, in the logits' dtype

    def expand(self, repeats: int) -> None:
        """Repeat each image ``repeats`` times (image i -> rows i*repeats .. +repeats-1);
        the cache keeps one copy of each image's cross-attention keys/values."""
        if self.cache is None:
            self.memory = self.memory.repeat_interleave(repeats, dim=0)

    def reorder(self, index: torch.Tensor) -> None:
        """Beam reordering; index stays within each image's beams, so cross K/V is kept."""
        if self.cache is not None:
            self.cache.reorder(index)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            logits = self.head.step(tokens, self.memory)
        else:
            logits = self.head.step(tokens, None, self.cache)
        if self.bias is None:  # an added bias: no host-to-device index copy per step
            self.bias = torch.zeros_like(logits[0])
            self.bias[list(self.forbidden)] = float("-inf")
        return logits + self.bias


def _should_stop(step: int, finished: torch.Tensor) -> bool:
    return step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool(finished.all())


def _strip(tokens: torch.Tensor, eos_idx: int, pad_idx: int) -> list[list[int]]:
    """Drop the leading [SOS], cut at the first [EOS], drop padding."""
    captions = []
    for row in tokens[:, 1:].tolist():
        if eos_idx in row:
            row = row[: row.index(eos_idx)]
        captions.append([t for t in row if t != pad_idx])
    return captions


def _max_steps(head: TransformerTextualHead, max_length: int) -> int:
    return max(0, min(max_length, head.max_caption_length))


@torch.no_grad()
def greedy_search(
    head: TransformerTextualHead,
    visual_features: torch.Tensor,
    sos_idx: int = 2,
    eos_idx: int = 3,
    max_length: int = 30,
    use_cache: bool = True,
) -> list[list[int]]:
    """Pick the most likely token at every step."""
    return _sample_loop(head, visual_features, sos_idx, eos_idx, max_length, use_cache, None)


@torch.no_grad()
def nucleus_sampling(
    head: TransformerTextualHead,
    visual_features: torch.Tensor,
    sos_idx: int = 2,
    eos_idx: int = 3,
    max_length: int = 30,
    top_p: float = 0.9,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample each token from the smallest set of tokens whose probability reaches ``top_p``.

    Deterministic for a given ``generator`` state (it must live on the logits' device).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return _sample_loop(
        head, visual_features, sos_idx, eos_idx, max_length, use_cache, (top_p, generator)
    )


def _sample_loop(
    head: TransformerTextualHead,
    visual_features: torch.Tensor,
    sos_idx: int,
    eos_idx: int,
    max_length: int,
    use_cache: bool,
    nucleus: tuple[float, torch.Generator | None] | None,
) -> list[list[int]]:
    """Greedy (``nucleus=None``) or nucleus sampling with ``nucleus=(top_p, generator)``."""
    pad_idx = head.padding_idx
    stepper = _Stepper(head, head.encode_visual(visual_features), use_cache, (pad_idx, sos_idx))
    n = visual_features.size(0)
    tokens = torch.full((n, 1), sos_idx, dtype=torch.long, device=visual_features.device)
    finished = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    for step in range(_max_steps(head, max_length)):
        logits = stepper(tokens)
        if nucleus is None:
            next_tokens = logits.argmax(dim=-1)
        else:
            next_tokens = _nucleus_pick(logits, *nucleus)
        next_tokens = next_tokens.masked_fill(finished, pad_idx)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= next_tokens == eos_idx
        if _should_stop(step, finished):
            break
    return _strip(tokens, eos_idx, pad_idx)


def _nucleus_pick(
    logits: torch.Tensor, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # keeps the top one
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return sorted_ids.gather(1, choice).squeeze(1)


@torch.no_grad()
def beam_search(
    head: TransformerTextualHead,
    visual_features: torch.Tensor,
    sos_idx: int = 2,
    eos_idx: int = 3,
    max_length: int = 30,
    beam_size: int = 5,
    use_cache: bool = True,
) -> list[list[int]]:
    """Beam search batched over images x beams; returns the best beam per image.

    A beam's score is the plain sum of its token log-probabilities (no length
    normalisation, so shorter captions are slightly favoured). A beam that emits
    [EOS] is finished: it stays in the beam with its score frozen (its only
    continuation is [PAD] at log-prob 0) and competes with the live beams. Since
    scores only decrease, decoding stops once every image's best beam is finished.
    """
    tokens, _ = _beams(head, visual_features, sos_idx, eos_idx, max_length, beam_size,
                       use_cache, until_all_finished=False)
    return _strip(tokens[:, 0], eos_idx, head.padding_idx)  # topk sorts: beam 0 is the best


@torch.no_grad()
def beam_search_all(
    head: TransformerTextualHead,
    visual_features: torch.Tensor,
    sos_idx: int = 2,
    eos_idx: int = 3,
    max_length: int = 30,
    beam_size: int = 5,
    decoder: str = "standard",
    use_cache: bool = True,
) -> list[list[tuple[list[int], float]]]:
    """Every beam of :func:`beam_search` (or, with ``decoder="paper"``, of
    :func:`paper_beams`), with its score: per image, ``beam_size`` (token ids,
    log-probability) pairs, best first. Decoding goes on until every beam has finished
    (or ``max_length``), so the other beams are whole captions too; the best one is
    :func:`generate`'s beam-search caption."""
    _check_decoder(decoder, "beam")
    if decoder == "paper":
        tokens, scores = paper_beams(head, visual_features, sos_idx, eos_idx, max_length,
                                     beam_size, use_cache)
        n, b = scores.shape
        ids = _paper_ids(tokens.view(n * b, -1), sos_idx, eos_idx)
    else:
        tokens, scores = _beams(head, visual_features, sos_idx, eos_idx, max_length,
                                beam_size, use_cache, until_all_finished=True)
        n, b = scores.shape
        ids = _strip(tokens.view(n * b, -1), eos_idx, head.padding_idx)
    return [[(ids[i * b + j], float(score)) for j, score in enumerate(row)]
            for i, row in enumerate(scores.tolist())]


def _beams(head: TransformerTextualHead, visual_features: torch.Tensor, sos_idx: int,
           eos_idx: int, max_length: int, beam_size: int, use_cache: bool,
           until_all_finished: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The beam search of :func:`beam_search`: tokens (N, B, 1 + steps) including [SOS] and
    scores (N, B) of every image's beams, sorted best first. It stops once every image's
    best beam (or, with ``until_all_finished``, every beam) is finished."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    pad_idx = head.padding_idx
    n, b = visual_features.size(0), beam_size
    device = visual_features.device
    stepper = _Stepper(head, head.encode_visual(visual_features), use_cache, (pad_idx, sos_idx))
    stepper.expand(b)

    tokens = torch.full((n * b, 1), sos_idx, dtype=torch.long, device=device)
    finished = torch.zeros(n, b, dtype=torch.bool, device=device)
    # Only the first beam is live at the start: the others are copies of it.
    scores = torch.full((n, b), float("-inf"), device=device)
    scores[:, 0] = 0.0
    base = torch.arange(n, device=device)[:, None] * b
    frozen = None

    for step in range(_max_steps(head, max_length)):
        logprobs = stepper(tokens).log_softmax(dim=-1)
        vocab = logprobs.size(-1)
        if frozen is None:
            # A finished beam's only continuation: [PAD] at log-probability 0.
            frozen = torch.full_like(logprobs[0], float("-inf"))
            frozen[pad_idx] = 0.0
            scores = scores.to(logprobs.dtype)
        logprobs = torch.where(finished[..., None], frozen, logprobs.view(n, b, vocab))

        candidates = (scores[..., None] + logprobs).view(n, b * vocab)
        scores, flat_ids = candidates.topk(b, dim=1)
        beam_ids, next_tokens = flat_ids // vocab, flat_ids % vocab

        reorder = (base + beam_ids).view(-1)
        tokens = torch.cat([tokens.index_select(0, reorder), next_tokens.view(-1, 1)], dim=1)
        finished = finished.gather(1, beam_ids) | (next_tokens == eos_idx)
        stepper.reorder(reorder)
        if _should_stop(step, finished if until_all_finished else finished[:, 0]):
            break
    return tokens.view(n, b, -1), scores


class _PaperStepper:
    """Next-token logits of the original's decoding step for prefixes that do not include
    [SOS] (positions 0..t-1); every fed token is attended, [PAD] id included.

    Without the cache this is the original's computation: at every step each beam runs the
    whole textual head (its image's visual features projected again, the decoder over the
    prefix, the output layer at every position)."""

    def __init__(self, head: TransformerTextualHead, visual_features: torch.Tensor,
                 use_cache: bool):
        self.head, self.visual = head, visual_features
        self.memory = head.encode_visual(visual_features)
        # cross-attention K/V once per image, shared by its beams
        self.cache = head.init_cache(self.memory) if use_cache else None

    def first(self, start: torch.Tensor) -> torch.Tensor:
        """Step 1: [SOS] (N, 1) alone; then the rows become the images' ``beams``."""
        if self.cache is None:
            return self.head.decode(start, self.memory, mask_padding=False)[:, -1]
        logits = self.head.step(start, None, self.cache)
        self.cache.clear()  # the prefix changes: step 2 feeds position 0 again
        return logits

    def expand(self, beams: int) -> None:
        """Rows i*beams .. +beams-1 decode image i."""
        if self.cache is None:
            self.visual = self.visual.repeat_interleave(beams, dim=0)

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            memory = self.head.encode_visual(self.visual)
            return self.head.decode(tokens, memory, mask_padding=False)[:, -1]
        return self.head.step(tokens, None, self.cache)


def _paper_proposals(logits: torch.Tensor, last: torch.Tensor, eos_idx: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` best (log-prob, token), best first, under the original's rules:
    log-softmax, then the row's ``last`` token at log-prob -10000, and after [EOS] only
    [EOS] at 0 (its other proposals at -inf are never kept: every beam has one finite).
    On a CPU, rows go in chunks that stay in cache across the passes over the vocabulary."""
    chunk = CPU_CHUNK_ROWS if logits.device.type == "cpu" else logits.size(0)
    top, tokens = [], []
    for rows, previous in zip(logits.split(chunk), last.split(chunk)):
        logprobs = rows.log_softmax(dim=-1).scatter_(1, previous[:, None], REPEAT_LOGPROB)
        values, ids = logprobs.topk(k, dim=1)
        top.append(values)
        tokens.append(ids)
    top, tokens = torch.cat(top), torch.cat(tokens)
    ended = (last == eos_idx)[:, None]
    after_eos = torch.full_like(top[:1], float("-inf"))
    after_eos[0, 0] = 0.0
    tokens[:, :1] = torch.where(ended, eos_idx, tokens[:, :1])
    return torch.where(ended, after_eos, top), tokens


@torch.no_grad()
def paper_beams(
    head: TransformerTextualHead,
    visual_features: torch.Tensor,
    sos_idx: int,
    eos_idx: int,
    max_length: int = 30,
    beam_size: int = 5,
    use_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original VirTex beam search: tokens (N, B, steps) without [SOS] and summed
    log-probs (N, B), each image's beams best first.

    Step 1 feeds [SOS] alone and keeps the top ``beam_size`` tokens of its log-softmax
    (nothing forbidden, [SOS] and [PAD] included). Each later step feeds the generated
    tokens only, without [SOS], at positions 0..t-1; after the log-softmax the token each
    beam has just produced gets log-prob -10000 and a finished beam (last token [EOS]) can
    only add [EOS] at log-prob 0. Each beam proposes its top 2 tokens and the best
    ``beam_size`` of those 2 x ``beam_size`` candidates (by score, a plain sum without
    length normalisation) are kept, ties in ``torch.topk``'s order over (beam, rank).
    It stops when every beam ends with [EOS] or after ``max_length`` tokens (capped by
    the ``max_caption_length + 1`` tokens the head's positions allow). One beam is the
    original's greedy decoding. With ``use_cache`` the steps from 2 on use a KV cache
    (step 1's is dropped: the prefix changes), else the decoder re-runs over the prefix.
    """
    if beam_size < 1 or max_length < 1:
        raise ValueError(f"beam_size and max_length must be >= 1, got {beam_size}, {max_length}")
    n, b = visual_features.size(0), beam_size
    stepper = _PaperStepper(head, visual_features, use_cache)
    device = stepper.memory.device
    start = torch.full((n, 1), sos_idx, dtype=torch.long, device=device)
    first = stepper.first(start).log_softmax(dim=-1)
    scores, tokens = first.topk(b, dim=1)
    tokens = tokens.view(n * b, 1)
    stepper.expand(b)
    k = min(PER_NODE_BEAM_SIZE, first.size(-1))
    base = torch.arange(n, device=device)[:, None] * b

    for step in range(1, min(max_length, head.max_caption_length + 1)):
        last = tokens[:, -1]
        if _should_stop(step, last == eos_idx):
            break
        top_logprobs, top_tokens = _paper_proposals(stepper(tokens), last, eos_idx, k)
        candidates = (scores.view(n * b, 1) + top_logprobs).view(n, b * k)
        scores, picked = candidates.topk(b, dim=1)
        reorder = (base + picked // k).view(-1)
        next_tokens = top_tokens.view(n, b * k).gather(1, picked).view(-1, 1)
        tokens = torch.cat([tokens.index_select(0, reorder), next_tokens], dim=1)
        stepper.reorder(reorder)
    return tokens.view(n, b, -1), scores


def _paper_ids(tokens: torch.Tensor, sos_idx: int, eos_idx: int) -> list[list[int]]:
    """The ids of the original's caption text: cut at the first [EOS]; [SOS] (which the
    search may generate) dropped, as sentencepiece decodes that control piece to nothing."""
    captions = []
    for row in tokens.tolist():
        if eos_idx in row:
            row = row[: row.index(eos_idx)]
        captions.append([t for t in row if t != sos_idx])
    return captions


def _check_decoder(decoder: str, method: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
    if decoder == "paper" and method not in PAPER_METHODS:
        raise ValueError(f"decoding method {method!r} exists only for decoder 'standard'; "
                         f"decoder 'paper' has {PAPER_METHODS}")


def generate(
    head: TransformerTextualHead,
    visual_features: torch.Tensor,
    method: str = "beam",
    sos_idx: int = 2,
    eos_idx: int = 3,
    beam_size: int = 5,
    max_length: int = 30,
    top_p: float = 0.9,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    decoder: str = "standard",
) -> list[list[int]]:
    """Dispatch to :func:`greedy_search`, :func:`beam_search` or :func:`nucleus_sampling`
    (``decoder="standard"``), or to :func:`paper_beams` (``"paper"``; greedy = one beam)."""
    _check_decoder(decoder, method)
    if decoder == "paper":
        b = 1 if method == "greedy" else beam_size
        tokens, _ = paper_beams(head, visual_features, sos_idx, eos_idx, max_length, b,
                                use_cache)
        return _paper_ids(tokens[:, 0], sos_idx, eos_idx)
    if method == "greedy":
        return greedy_search(head, visual_features, sos_idx, eos_idx, max_length, use_cache)
    if method == "beam":
        return beam_search(
            head, visual_features, sos_idx, eos_idx, max_length, beam_size, use_cache
        )
    if method == "nucleus":
        return nucleus_sampling(
            head, visual_features, sos_idx, eos_idx, max_length, top_p, use_cache, generator
        )
    raise AssertionError(method)  # unreachable: _check_decoder
