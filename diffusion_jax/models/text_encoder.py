"""CLIP's text transformer (Radford et al. 2021) in Flax: the text encoder of Stable Diffusion 1.x
(openai/clip-vit-large-patch14) and 2.x (OpenCLIP ViT-H/14), read from the transformers format by
`interop.clip` without torch or transformers.

token ids [B, L] -> token + position embeddings -> N pre-LayerNorm blocks (causal self-attention,
then an MLP with quick-GELU or GELU), each a residual update -> the final LayerNorm. Outputs:
  * "last_hidden_state" [B, L, D]: the final LayerNorm of the last block's output (SD 1.x's
    condition);
  * "hidden_states": a tuple of N + 1 arrays [B, L, D], the embeddings and each block's output,
    before the final LayerNorm (SD 2.x conditions on the penultimate; `clip_skip` k takes
    final_layer_norm(hidden_states[-(k + 1)]), as diffusers does: `skip_hidden_state`);
  * "pooled" [B, D]: last_hidden_state at the end-of-text token (the first `eos_token_id`; the
    largest id for the old configs whose eos_token_id is 2, as transformers does);
  * "text_embeds" [B, projection_dim] with `projection_dim` > 0: the pooled output through the
    bias-free `text_projection` (transformers' CLIPTextModelWithProjection, SDXL's second encoder).
Padding: an `attention_mask` [B, L] (1 = a token, 0 = padding) masks keys beside the causal mask;
Stable Diffusion passes none (its padding tokens are attended to, causally, as in training).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.lora import with_adapters

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class CLIPAttention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        B, L, D = x.shape
        heads = (self.num_heads, D // self.num_heads)
        project = lambda name: nn.Dense(D, dtype=self.dtype, name=name)
        q, k, v = (project(name)(x).reshape(B, L, *heads) for name in ("q_proj", "k_proj", "v_proj"))
        h = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return project("out_proj")(h.reshape(B, L, D))


class CLIPEncoderLayer(nn.Module):
    num_heads: int
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + CLIPAttention(self.num_heads, self.dtype, name="self_attn")(norm("layer_norm1")(x), mask)
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(norm("layer_norm2")(x))
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(ACTIVATIONS[self.activation](h))


class CLIPTextEncoder(nn.Module):
    """transformers' CLIPTextModel (its config's names; `activation` is hidden_act)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_positions: int = 77
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 0  # > 0: CLIPTextModelWithProjection's text_projection
    dtype: Any = jnp.float32

    def setup(self):
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"CLIP text encoder activation {self.activation!r} is not supported: "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise UsageError(f"CLIP text encoder width {self.hidden_size} is not divisible by {self.num_heads} heads")
        self.token_embedding = nn.Embed(self.vocab_size, self.hidden_size)
        self.position_embedding = nn.Embed(self.max_positions, self.hidden_size)
        self.layers = [CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.activation,
                                        self.layer_norm_eps, self.dtype, name=f"layers_{i}")
                       for i in range(self.num_layers)]
        self.final_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)
        if self.projection_dim:
            self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, input_ids, attention_mask: Optional[jax.Array] = None) -> dict:
        """input_ids int [B, L], L <= max_positions; attention_mask [B, L] or None (module docstring)."""
        B, L = input_ids.shape
        if L > self.max_positions:
            raise UsageError(f"{L} tokens are more than the text encoder's {self.max_positions} positions: "
                             "tokenize with truncation to that length")
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(L))[None]
        mask = jnp.tril(jnp.ones((L, L), bool))[None, None]  # [1, 1, L, L]: a query sees itself and before
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        ids = jnp.asarray(input_ids, jnp.int32)
        end = jnp.argmax(ids, axis=-1) if self.eos_token_id == 2 else jnp.argmax(ids == self.eos_token_id, axis=-1)
        out = {"last_hidden_state": last, "hidden_states": tuple(hidden_states), "pooled": last[jnp.arange(B), end]}
        if self.projection_dim:
            out["text_embeds"] = self.text_projection(out["pooled"])
        return out

    def skip_hidden_state(self, hidden_state):
        """The final LayerNorm of an earlier layer's output: diffusers' `clip_skip` embeddings."""
        return self.final_layer_norm(hidden_state)


@functools.lru_cache(maxsize=8)
def compiled_text_embeddings(encoder: CLIPTextEncoder, clip_skip: int = 0):
    """`text_embeddings` jitted once per encoder and clip_skip: (params, input_ids, LoRA layers) -> [B,
    L, D] (the parameters and the adapters, `lora.with_adapters`, arguments, not constants)."""
    return jax.jit(lambda params, ids, loras=(): text_embeddings(encoder, with_adapters(params, loras), ids,
                                                                 clip_skip=clip_skip))


def sdxl_condition(encoder: CLIPTextEncoder, encoder_2: CLIPTextEncoder, clip_skip: int = 0):
    """SDXL's text condition: (params, params_2, ids [B, L], ids_2 [B, L]) -> {"embeddings": both
    encoders' hidden states clip_skip + 2 from the end (the penultimate at 0; no final LayerNorm) side
    by side [B, L, D1 + D2], "pooled": the second's projected pooled output [B, P]}, as diffusers'
    StableDiffusionXLPipeline.encode_prompt."""
    def condition(params, params_2, ids, ids_2):
        first, second = encoder.apply({"params": params}, ids), encoder_2.apply({"params": params_2}, ids_2)
        k = clip_skip + 2
        return {"embeddings": jnp.concatenate([first["hidden_states"][-k], second["hidden_states"][-k]], axis=-1),
                "pooled": second["text_embeds"]}
    return condition


def sdxl_time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """float32 [batch, 6]: SDXL's micro-conditioning of an image generated at H x W, as diffusers'
    pipeline gives it (original size H x W, crop top-left (0, 0), target size H x W)."""
    return np.tile(np.float32([height, width, 0, 0, height, width]), (batch, 1))


def sdxl_zero_null(cond: dict) -> dict:
    """The condition SDXL guides against when no negative prompt is given (its
    force_zeros_for_empty_prompt): zero embeddings and pooled output, the time ids kept."""
    return {**cond, "embeddings": jnp.zeros_like(cond["embeddings"]), "pooled": jnp.zeros_like(cond["pooled"])}


@functools.lru_cache(maxsize=4)
def compiled_sdxl_condition(encoder: CLIPTextEncoder, encoder_2: CLIPTextEncoder, clip_skip: int = 0):
    """`sdxl_condition` jitted once per encoder pair, with LoRA layers on each: (params, params_2, ids,
    ids_2, layers, layers_2) -> the condition."""
    condition = sdxl_condition(encoder, encoder_2, clip_skip)
    return jax.jit(lambda params, params_2, ids, ids_2, loras, loras_2: condition(
        with_adapters(params, loras), with_adapters(params_2, loras_2), ids, ids_2))


def text_embeddings(encoder: CLIPTextEncoder, params, input_ids, *, clip_skip: int = 0, attention_mask=None):
    """[B, L, D] the condition a diffusion model gets: the last hidden state (clip_skip 0) or the
    final LayerNorm of the output clip_skip layers before the last."""
    if not 0 <= clip_skip < encoder.num_layers + 1:
        raise UsageError(f"clip_skip {clip_skip} is out of range for a {encoder.num_layers}-layer text encoder")
    out = encoder.apply({"params": params}, input_ids, attention_mask)
    if clip_skip == 0:
        return out["last_hidden_state"]
    return encoder.apply({"params": params}, out["hidden_states"][-(clip_skip + 1)], method="skip_hidden_state")
