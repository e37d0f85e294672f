"""Greedy decoding with each decode step replayed from one CUDA graph.

On a GPU, a decode step of a transformers model is bound by Python and kernel launches: hundreds
of small kernels per layer, each dispatched from Python. Capturing the step once (forward with a
fixed-size KV cache, LM head, argmax, advance of the positions) and replaying it costs one launch
per step. The graph's inputs live in fixed buffers: the previous tokens, positions, the attention
mask and the cache's write index; the ablation hooks read their directions and weights from fixed
buffers too (`AblationHooks(static=True)`), so one capture serves every trial of a study.

The prefill stays eager (prompts differ in length); its cache is copied into the fixed buffers.
Rows do not leave the batch (on a GPU a smaller batch is not faster); decoding stops once every
row is decided. Only decoders with full attention everywhere and sdpa or eager attention qualify
(the prepared 4-D mask is passed as is), on one GPU (a model spread over several by a device map
decodes eagerly); `scoring.graph_error` compares the graph's first step with the eager path
before a study uses it.
"""

from __future__ import annotations

import torch

from optimizer.forward import cache_keyword, output_logits
from optimizer.model import LoadedModel
from optimizer.packing import full_attention_only, layer_tensors, mask_values

WARMUP_STEPS = 2  # eager steps before the capture, on the first prefill's state


def supports_graph_decoding(loaded: LoadedModel) -> bool:
    """CUDA, unquantised, and full attention in every layer (a fixed K/V buffer holds nothing else)."""
    return loaded.device.type == "cuda" and loaded.quantization is None and full_attention_only(loaded)


class FixedCache:
    """K/V buffers of a fixed length that decoder layers write through `update`, the one cache
    method they call; the next token's K/V go to position `index` (a device tensor, so that a
    captured graph reads it at replay)."""

    def __init__(
        self, layer_shapes: list[tuple[int, int, int]], batch: int, length: int, dtype: torch.dtype, device: torch.device
    ):
        self.keys = [torch.zeros(batch, heads, length, k_dim, dtype=dtype, device=device) for heads, k_dim, _ in layer_shapes]
        self.values = [torch.zeros(batch, heads, length, v_dim, dtype=dtype, device=device) for heads, _, v_dim in layer_shapes]
        self.index = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.index, key_states)
        self.values[layer_idx].index_copy_(2, self.index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # only consulted for positions, which are always passed explicitly

    def __len__(self) -> int:
        return len(self.keys)


class GraphDecoder:
    """Fixed buffers for `batch` rows of up to `length` tokens, and the captured decode step."""

    def __init__(self, loaded: LoadedModel, batch: int, length: int, capture: bool = True):
        if loaded.split:
            raise ValueError(f"a CUDA graph is captured on one device, and this model's blocks are spread: {loaded.placement()}")
        self.loaded, self.batch, self.length, self.capture = loaded, batch, length, capture
        self._decoder = loaded.model.get_decoder()
        self._keyword = cache_keyword(self._decoder)
        device = loaded.device
        self._allowed, self._blocked = mask_values(loaded)
        self._room = length + WARMUP_STEPS  # buffers hold the warm-up steps past the longest prefill
        self.mask = self._blocked.expand(batch, 1, 1, self._room).clone()
        self._new_column = self._allowed.expand(batch, 1, 1, 1).clone()  # index_copy_: index_fill_ syncs, which capture forbids
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.cache: FixedCache | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> None:
        assert self.cache is not None, "load() makes the cache before the first step"
        self.mask.index_copy_(3, self.cache.index, self._new_column)
        hidden = self._decoder(
            input_ids=self.ids.unsqueeze(-1),
            attention_mask=self.mask,
            position_ids=self.positions,
            use_cache=True,
            **{self._keyword: self.cache},
        ).last_hidden_state
        logits = output_logits(self.loaded.model, hidden[:, -1, :])
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        self.ids.copy_(logits.argmax(dim=-1))
        self.positions.add_(1)
        self.cache.index.add_(1)

    def load(self, cache, mask: torch.Tensor, next_ids: torch.Tensor, steps: int) -> None:
        """Start decoding from an eager prefill: its cache (rows x heads x T x dim per layer), its
        (rows, T) attention mask and the first generated tokens, for up to `steps` more tokens.
        Rows beyond the prefill's repeat its first row (their output is ignored)."""
        layers = layer_tensors(cache)
        rows, width = mask.shape
        if width + steps > self.length or rows > self.batch:
            raise ValueError(f"{rows} rows of {width} + {steps} tokens do not fit the graph's {self.batch} x {self.length}")
        if self.cache is None:
            shapes = [(k.shape[1], k.shape[3], v.shape[3]) for k, v in layers]
            self.cache = FixedCache(shapes, self.batch, self._room, layers[0][0].dtype, self.loaded.device)
        fill = lambda dst, src: (dst[:rows].copy_(src), dst[rows:].copy_(src[:1].expand_as(dst[rows:])))
        for (keys, values), k_buf, v_buf in zip(layers, self.cache.keys, self.cache.values):
            fill(k_buf[:, :, :width], keys)
            fill(v_buf[:, :, :width], values)
        self.mask.copy_(self._blocked.expand_as(self.mask))
        allowed = torch.where(mask.bool(), self._allowed, self._blocked)
        fill(self.mask[:, 0, 0, :width], allowed)
        fill(self.ids, next_ids)
        fill(self.positions, mask.sum(dim=-1, keepdim=True))
        self.cache.index.fill_(width)
        if self.capture and self._graph is None:
            self._capture()
            self.load(cache, mask, next_ids, steps)  # the warm-up and captured steps moved the state on

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):  # allocations and lazy initialisations happen before capture
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._step()

    def step(self) -> torch.Tensor:
        """One decode step; returns the next tokens (batch,)."""
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()
        return self.ids
