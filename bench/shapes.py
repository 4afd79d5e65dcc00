"""Parameter-shape lists of real models, the workloads of every benchmark (DESIGN.md §6).

An optimizer step's cost depends on the total element count *and* on how it is split into
tensors (per-tensor launch and bookkeeping overheads), so the benchmarks use the exact
parameter lists of real models, not one big tensor.

* ``gpt2``: GPT-2 small (Radford et al. 2019; Hugging Face ``gpt2``), tied lm_head:
  124,439,808 params in 148 tensors.
* ``llama1b``: a ~1B Llama-like config (the GPU workload): hidden 2048, 16 layers, 32 heads
  with full multi-head attention (q, k, v, o all 2048x2048, no GQA), SwiGLU MLP with
  intermediate 5632 (gate, up, down), RMSNorm weights (no biases anywhere), vocab 32000,
  untied ``lm_head``: 953,223,168 params in 147 tensors.
* ``tiny``: a few small tensors of awkward sizes, for smoke tests and the reference backend.
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]


def gpt2_small() -> list[tuple[str, Shape]]:
    """GPT-2 small's 148 parameter tensors, in ``named_parameters()`` order (Conv1D layout)."""
    d, ff, vocab, ctx, layers = 768, 3072, 50257, 1024, 12
    shapes: list[tuple[str, Shape]] = [("wte", (vocab, d)), ("wpe", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}"
        shapes += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (d, 3 * d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (d, ff)),
            (f"{h}.mlp.c_fc.bias", (ff,)),
            (f"{h}.mlp.c_proj.weight", (ff, d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def llama_1b() -> list[tuple[str, Shape]]:
    """The ~1B Llama-like config of the module docstring: 147 tensors, nn.Linear layout."""
    d, ff, vocab, layers = 2048, 5632, 32000, 16
    shapes: list[tuple[str, Shape]] = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        h = f"layers.{i}"
        shapes += [
            (f"{h}.self_attn.q_proj.weight", (d, d)),
            (f"{h}.self_attn.k_proj.weight", (d, d)),
            (f"{h}.self_attn.v_proj.weight", (d, d)),
            (f"{h}.self_attn.o_proj.weight", (d, d)),
            (f"{h}.mlp.gate_proj.weight", (ff, d)),
            (f"{h}.mlp.up_proj.weight", (ff, d)),
            (f"{h}.mlp.down_proj.weight", (d, ff)),
            (f"{h}.input_layernorm.weight", (d,)),
            (f"{h}.post_attention_layernorm.weight", (d,)),
        ]
    return [*shapes, ("norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def tiny() -> list[tuple[str, Shape]]:
    """Small awkward sizes (odd lengths, an empty tensor, a matrix): fast on any backend."""
    return [("a", (7,)), ("b", (33, 5)), ("empty", (0,)), ("c", (1000,)), ("d", (64, 48))]


MODELS = {"gpt2": gpt2_small, "llama1b": llama_1b, "tiny": tiny}


def model_shapes(model: str) -> list[tuple[str, Shape]]:
    """The named parameter shapes of ``model`` (one of :data:`MODELS`)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    return MODELS[model]()


def numel(shapes: list[tuple[str, Shape]]) -> int:
    """Total element count of a shape list."""
    return sum(math.prod(shape) for _, shape in shapes)
