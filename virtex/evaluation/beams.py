"""Beam search that keeps every beam and its score (for showing alternative captions).

Same rules as :func:`virtex.models.decoding.beam_search` (sum of token log-probs,
[PAD]/[SOS] never generated, a finished beam keeps its score and competes), built on
the head's public step API with its KV cache, so the best beam is the caption
``model.generate(method="beam")`` gives. It runs until every beam has finished (or
``max_length``), so the other beams are whole captions too.
"""

from __future__ import annotations

import torch

from virtex.models.textual import TransformerTextualHead


@torch.no_grad()
def beam_search_all(head: TransformerTextualHead, visual_features: torch.Tensor,
                    sos_idx: int = 2, eos_idx: int = 3, max_length: int = 30,
                    beam_size: int = 5) -> list[list[tuple[list[int], float]]]:
    """Per image, ``beam_size`` (token ids without [SOS]/[EOS], log-prob) pairs, best first."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    pad, n, b = head.padding_idx, visual_features.size(0), beam_size
    device = visual_features.device
    cache = head.init_cache(head.encode_visual(visual_features))
    cache.index_select(torch.arange(n, device=device).repeat_interleave(b))

    tokens = torch.full((n * b, 1), sos_idx, dtype=torch.long, device=device)
    finished = torch.zeros(n, b, dtype=torch.bool, device=device)
    scores = torch.full((n, b), float("-inf"), device=device)
    scores[:, 0] = 0.0  # the other beams start as copies: keep them out of the first top-k
    base = torch.arange(n, device=device)[:, None] * b
    for _ in range(max(0, min(max_length, head.max_caption_length))):
        logits = head.step(tokens, None, cache)
        logits[:, [pad, sos_idx]] = float("-inf")
        logprobs = logits.log_softmax(dim=-1).view(n, b, -1)
        vocab = logprobs.size(-1)
        stay = torch.full_like(logprobs[0, 0], float("-inf"))
        stay[pad] = 0.0  # a finished beam's only continuation: [PAD], score unchanged
        logprobs = torch.where(finished[..., None], stay, logprobs)
        scores, flat = (scores.to(logprobs.dtype)[..., None] + logprobs).view(n, -1).topk(b, dim=1)
        source, next_tokens = flat // vocab, flat % vocab
        order = (base + source).view(-1)
        tokens = torch.cat([tokens.index_select(0, order), next_tokens.view(-1, 1)], dim=1)
        finished = finished.gather(1, source) | (next_tokens == eos_idx)
        cache.index_select(order, include_cross=False)
        if finished.all():
            break

    out = []
    for rows, row_scores in zip(tokens.view(n, b, -1).tolist(), scores.tolist()):
        beams = []
        for row, score in zip(rows, row_scores):
            row = row[1:]
            row = row[: row.index(eos_idx)] if eos_idx in row else row
            beams.append(([t for t in row if t != pad], float(score)))
        out.append(beams)
    return out
