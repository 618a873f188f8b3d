"""Transformer textual head: embeds caption tokens and decodes them against visual features.

The layout follows VirTex (Desai & Johnson, 2021): word + learned positional embedding
with LayerNorm, a linear projection of the flattened visual feature map, a stack of
transformer decoder layers (GELU, post-norm by default) and an output layer tied to the
word embedding. Attention is written out here (separate q/k/v projections) so that
incremental decoding with a key/value cache is straightforward.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

_SIZE_RE = re.compile(r"L(\d+)_H(\d+)(?:_A(\d+)_F(\d+))?")


def parse_textual_size(name: str) -> dict:
    """Parse ``"L1_H2048_A32_F8192"`` (or ``"L1_H512"``: heads H/64, feedforward 4H)."""
    match = _SIZE_RE.fullmatch(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"bad textual head size {name!r}: expected 'L<layers>_H<hidden>' or "
            "'L<layers>_H<hidden>_A<heads>_F<feedforward>', e.g. 'L1_H2048_A32_F8192'"
        )
    layers, hidden = int(match[1]), int(match[2])
    heads = int(match[3]) if match[3] else max(1, hidden // 64)
    feedforward = int(match[4]) if match[4] else 4 * hidden
    if min(layers, hidden, heads, feedforward) <= 0 or hidden % heads:
        raise ValueError(
            f"bad textual head size {name!r}: all numbers must be positive and the hidden "
            f"size ({hidden}) divisible by the number of heads ({heads})"
        )
    return {
        "num_layers": layers,
        "hidden_size": hidden,
        "attention_heads": heads,
        "feedforward_size": feedforward,
    }


class WordAndPositionEmbedding(nn.Module):
    """Word + learned position embedding, LayerNorm (eps 1e-8), dropout; padding -> 0."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_caption_length: int = 30,
        dropout: float = 0.0,
        padding_idx: int = 0,
    ):
        super().__init__()
        self.padding_idx = padding_idx
        self.max_caption_length = max_caption_length
        self.words = nn.Embedding(vocab_size, hidden_size, padding_idx=padding_idx)
        self.positions = nn.Embedding(max_caption_length, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(N, T) tokens at positions ``start .. start+T-1`` -> (N, T, H)."""
        end = start + tokens.size(1)
        if end > self.max_caption_length:
            raise ValueError(
                f"caption positions up to {end} exceed max_caption_length {self.max_caption_length}"
            )
        x = self.layer_norm(self.words(tokens) + self.positions.weight[start:end])
        x = self.dropout(x)
        return x * (tokens != self.padding_idx).unsqueeze(-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections.

    Keys/values are projected by :meth:`project_kv` so callers can cache them; the attention
    itself is :func:`torch.nn.functional.scaled_dot_product_attention` (one fused kernel where
    the device has one).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout  # on the attention weights, while training
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        return x.view(n, t, self.num_heads, h // self.num_heads).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, S, H) -> keys, values, each (N, heads, S, H/heads)."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries from ``x`` (N, T, H) attend to ``k``/``v``; ``mask`` True = may attend.

        With fewer key rows than query rows (images and their beams: rows i*B .. i*B+B-1
        of ``x`` belong to key row i), each image's B*T queries attend together, so its
        keys/values are read once, not B times; ``mask`` is then per image, (N/B, 1, B*T, S).
        """
        n, t, h = x.shape
        if n != k.size(0):
            x = x.reshape(k.size(0), (n // k.size(0)) * t, h)
        q = self._split(self.q_proj(x))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).flatten(2)).reshape(n, t, h)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to visual features, GELU feed-forward.

    Post-norm (``norm_first=False``) matches ``nn.TransformerDecoderLayer``; pre-norm
    puts each LayerNorm at the start of its residual branch.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        feedforward_size: int,
        dropout: float = 0.1,
        norm_first: bool = False,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(hidden_size, num_heads, dropout)
        self.cross_attn = Attention(hidden_size, num_heads, dropout)
        self.linear1 = nn.Linear(hidden_size, feedforward_size)
        self.linear2 = nn.Linear(feedforward_size, hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.norm3 = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)  # on each residual branch
        self.ff_dropout = nn.Dropout(dropout)  # inside the feed-forward

    def _self_attention(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache | None
    ) -> torch.Tensor:
        k, v = self.self_attn.project_kv(x)
        if cache is not None:
            k, v = cache.append(k, v)
        return self.dropout(self.self_attn(x, k, v, mask))

    def _cross_attention(self, x: torch.Tensor, memory_kv: tuple) -> torch.Tensor:
        return self.dropout(self.cross_attn(x, *memory_kv))

    def _feedforward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.ff_dropout(F.gelu(self.linear1(x)))))

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """``memory_kv``: cross-attention keys/values (one row per image, see
        :meth:`Attention.forward`); ``cache``: this layer's self-attention keys/values."""
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), mask, cache)
            x = x + self._cross_attention(self.norm2(x), memory_kv)
            return x + self._feedforward(self.norm3(x))
        x = self.norm1(x + self._self_attention(x, mask, cache))
        x = self.norm2(x + self._cross_attention(x, memory_kv))
        return self.norm3(x + self._feedforward(x))


class LayerCache:
    """One layer's decoding state: its cross-attention keys/values (one row per image) and
    the self-attention keys/values of every position fed, kept where they were written:
    buffers (images, capacity, B, heads, d) for B rows (beams) per image. Reordering beams
    moves no keys; :class:`KVCache` tracks which beam's keys each row reads."""

    def __init__(self, cross_k: torch.Tensor, cross_v: torch.Tensor, capacity: int):
        self.cross_k, self.cross_v, self.capacity = cross_k, cross_v, capacity
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0  # positions written

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (rows, heads, T, d) keys/values after the positions written so
        far; return every image's keys/values as (images, heads, positions * B, d),
        position-major."""
        images = self.cross_k.size(0)
        rows, heads, t, d = k.shape
        if self.buffers is None:
            shape = (images, self.capacity, rows // images, heads, d)
            self.buffers = (k.new_empty(shape), v.new_empty(shape))
        start, self.length = self.length, self.length + t
        for buffer, new in zip(self.buffers, (k, v)):
            new = new.view(images, -1, heads, t, d).permute(0, 3, 1, 2, 4)
            buffer[:, start:self.length] = new
        return tuple(b[:, : self.length].flatten(1, 2).transpose(1, 2) for b in self.buffers)

    def clear(self) -> None:
        """Forget the written positions; the cross-attention keys/values stay."""
        self.buffers, self.length = None, 0


class KVCache:
    """Decoding state of every layer (:class:`LayerCache`). The rows being decoded are the
    images' beams, rows i*B .. i*B+B-1 of image i (B set by the first step). ``slots[r, p]``
    is the beam whose keys/values at position p row r reads: a beam reorder rewrites this
    table, not the keys."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers
        self.length = 0  # positions fed so far
        self.slots: torch.Tensor | None = None  # (rows, capacity) long

    def extend(self, rows: int, t: int, device: torch.device) -> torch.Tensor:
        """Start a step of ``t`` positions for ``rows`` rows: the self-attention mask, per
        image (images, 1, B*t, positions*B), True where a query may attend."""
        capacity, images = self.layers[0].capacity, self.layers[0].cross_k.size(0)
        start, end = self.length, self.length + t
        if end > capacity:
            raise ValueError(f"cache holds {capacity} positions, {end} were fed")
        beams = rows // images
        own = torch.arange(rows, device=device) % beams
        if self.slots is None:
            self.slots = own[:, None].repeat(1, capacity)
        self.slots[:, start:end] = own[:, None]
        self.length = end
        ancestor = self.slots[:, :end, None] == torch.arange(beams, device=device)  # (R, L, B)
        fed = torch.arange(start, end, device=device)[:, None]
        causal = torch.arange(end, device=device) <= fed
        mask = ancestor[:, None] & causal[None, :, :, None]  # (R, t, L, B)
        return mask.view(images, 1, beams * t, end * beams)

    def reorder(self, index: torch.Tensor) -> None:
        """Row r continues row ``index[r]`` (``index`` must stay within each image)."""
        if self.slots is not None:
            beams = self.slots.size(0) // self.layers[0].cross_k.size(0)
            rows = torch.arange(index.numel(), device=index.device)
            torch._assert_async((index // beams == rows // beams).all(),
                                "KVCache.reorder: a row can only continue a beam of its image")
            self.slots = self.slots.index_select(0, index)

    def clear(self) -> None:
        """Forget the fed positions (the rows may change); the images' keys/values stay."""
        self.length, self.slots = 0, None
        for layer in self.layers:
            layer.clear()


class TransformerTextualHead(nn.Module):
    """Caption decoder conditioned on a visual feature map (see module docstring).

    ``size`` (e.g. ``"L1_H2048_A32_F8192"``) overrides the four size arguments.
    ``embedding`` makes this head use (share) an existing word/position embedding.
    Without a final LayerNorm in pre-norm mode, as in the original VirTex code.
    Weights are initialised as the original's (:func:`_init_weights`); ``zero_biases``
    zeroes every linear bias instead of keeping PyTorch's default (BERT's init).
    """

    def __init__(
        self,
        visual_feature_size: int,
        vocab_size: int,
        hidden_size: int = 512,
        num_layers: int = 1,
        attention_heads: int | None = None,
        feedforward_size: int | None = None,
        dropout: float = 0.1,
        norm_first: bool = False,
        max_caption_length: int = 30,
        padding_idx: int = 0,
        size: str | None = None,
        embedding: WordAndPositionEmbedding | None = None,
        zero_biases: bool = False,
    ):
        super().__init__()
        if size is not None:
            parsed = parse_textual_size(size)
            hidden_size, num_layers = parsed["hidden_size"], parsed["num_layers"]
            attention_heads = parsed["attention_heads"]
            feedforward_size = parsed["feedforward_size"]
        attention_heads = attention_heads or max(1, hidden_size // 64)
        feedforward_size = feedforward_size or 4 * hidden_size
        if hidden_size % attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not divisible by attention_heads {attention_heads}"
            )
        self.config = {
            "visual_feature_size": visual_feature_size,
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "attention_heads": attention_heads,
            "feedforward_size": feedforward_size,
            "dropout": dropout,
            "norm_first": norm_first,
            "max_caption_length": max_caption_length,
            "padding_idx": padding_idx,
            "zero_biases": zero_biases,
        }
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.padding_idx = padding_idx
        self.max_caption_length = max_caption_length

        self.visual_projection = nn.Linear(visual_feature_size, hidden_size)
        self.embedding = WordAndPositionEmbedding(
            vocab_size, hidden_size, max_caption_length, dropout, padding_idx
        )
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_size, attention_heads, feedforward_size, dropout, norm_first)
            for _ in range(num_layers)
        )
        self.output = nn.Linear(hidden_size, vocab_size)
        self.apply(_init_weights)
        if zero_biases:
            zero_linear_biases(self)
        if embedding is not None:
            self.embedding = embedding
        self.output.weight = self.embedding.words.weight  # tied

    def share_embedding_with(self, other: TransformerTextualHead) -> None:
        """Use ``other``'s embedding and (tied) output layer, bias included, as VirTex does."""
        self.embedding = other.embedding
        self.output = other.output

    def encode_visual(self, visual_features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) (or already flat (N, S, C)) features -> memory (N, h*w, H)."""
        if visual_features.dim() == 4:
            visual_features = visual_features.flatten(2).transpose(1, 2)
        return self.visual_projection(visual_features)

    def decode(
        self, tokens: torch.Tensor, memory: torch.Tensor, causal: bool = True,
        mask_padding: bool = True,
    ) -> torch.Tensor:
        """Full pass: (N, T) tokens against memory (N, S, H) -> logits (N, T, V).

        Padding tokens are masked as keys (``mask_padding=False``: they are attended, with
        their zero embedding, as the original's decoding step does and as the KV-cached
        :meth:`step` does); ``causal=False`` gives bidirectional attention.
        """
        x = self.embedding(tokens)
        mask = (tokens != self.padding_idx)[:, None, None, :]
        if not mask_padding:
            mask = torch.ones_like(mask)
        if causal:
            t = tokens.size(1)
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        for layer in self.layers:
            x = layer(x, layer.cross_attn.project_kv(memory), mask)
        return self.output(x)

    def forward(
        self, visual_features: torch.Tensor, tokens: torch.Tensor, causal: bool = True
    ) -> torch.Tensor:
        """(N, C, h, w) features and (N, T) tokens -> (N, T, V) next-token logits."""
        return self.decode(tokens, self.encode_visual(visual_features), causal)

    def init_cache(self, memory: torch.Tensor) -> KVCache:
        """Compute every layer's cross-attention keys/values once from memory (N, S, H)."""
        layers = []
        for layer in self.layers:
            k, v = layer.cross_attn.project_kv(memory)
            layers.append(LayerCache(k, v, self.max_caption_length))
        return KVCache(layers)

    def step(
        self, tokens: torch.Tensor, memory: torch.Tensor | None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits (N, V) for the position after ``tokens``.

        Without a cache, ``tokens`` is the whole prefix (N, t) and the full decoder is
        re-run over it (naive path; needs ``memory``). With a cache (from
        :meth:`init_cache`), only the last token ((N,) or the last column of (N, t)) is
        fed; the cache's self-attention keys/values grow by one position.
        """
        if cache is None:
            if memory is None:
                raise ValueError("step() without a cache needs the visual memory")
            return self.decode(tokens, memory)[:, -1]
        last = tokens[:, -1:] if tokens.dim() == 2 else tokens[:, None]
        x = self.embedding(last, start=cache.length)
        mask = cache.extend(x.size(0), x.size(1), x.device)
        for layer, layer_cache in zip(self.layers, cache.layers):
            memory_kv = (layer_cache.cross_k, layer_cache.cross_v)
            x = layer(x, memory_kv, mask=mask, cache=layer_cache)
        return self.output(x[:, -1])


def _init_weights(module: nn.Module) -> None:
    """The original VirTex init (for ``Module.apply``): N(0, 0.02) linear and embedding
    weights, zero padding embedding; biases as PyTorch initialises them there, i.e. zero
    in attention (``nn.MultiheadAttention`` zeroes its in- and out-projection biases) and
    ``nn.Linear``'s default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) elsewhere (feed-forward,
    visual projection, output layer). LayerNorms keep gain 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, Attention):
        for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            nn.init.zeros_(proj.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def zero_linear_biases(module: nn.Module) -> None:
    """Zero every ``nn.Linear`` bias in ``module`` (BERT's init; the option
    ``zero_biases=True`` of :class:`TransformerTextualHead`)."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
