"""A small decoder-only transformer language model (GPT-2 style, pre-LN) and its next-token Task.

Parameter paths (what `sharding_rules` match), e.g. for layer 0:
    params/embed/embedding (vocab, d)              params/pos_embed (max_len, d)
    params/Block_0/attn/{query,key,value}/kernel (d, d)  -> (None, "model"): heads split over "model"
    params/Block_0/attn/out/kernel (d, d)                 -> ("model", None)
    params/Block_0/mlp/up/kernel (d, 4d)                  -> (None, "model")
    params/Block_0/mlp/down/kernel (4d, d)                -> ("model", None)
The output head is tied to the token embedding. Any sequence length up to `max_len` works (positions are
gathered for the input's length), so the exported `predict` has a symbolic "seq" dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trainkit.errors import TrainkitError
from trainkit.models import InputSpec, Task

SHARDING_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/(query|key|value)/kernel$", (None, "model")),
    (r"attn/(query|key|value)/bias$", ("model",)),
    (r"attn/out/kernel$", ("model", None)),
    (r"mlp/up/kernel$", (None, "model")),
    (r"mlp/up/bias$", ("model",)),
    (r"mlp/down/kernel$", ("model", None)),
)


def gelu(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU written out in plain ops (no custom_jvp). Associated as in jax.nn.gelu, the form
    the TorchScript exporter fuses into one native expression (`0.5 * x * (...)` is not matched)."""
    return x * (0.5 * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x**3))))


class CausalSelfAttention(nn.Module):
    num_heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, t, d = x.shape
        head = d // self.num_heads
        q, k, v = (nn.Dense(d, name=name)(x).reshape(b, t, self.num_heads, head)
                   for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(head).astype(x.dtype)
        pos = jnp.arange(t)
        causal = pos[:, None] >= pos[None, :]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
        y = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, t, d)
        return nn.Dense(d, name="out")(y)


class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(x.shape[-1], name="down")(gelu(nn.Dense(self.hidden, name="up")(x)))


class Block(nn.Module):
    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        drop = nn.Dropout(self.dropout, deterministic=not train)
        attn = CausalSelfAttention(self.num_heads, self.dropout, name="attn")
        x = x + drop(attn(nn.LayerNorm(name="ln1")(x), train))
        return x + drop(MLP(self.mlp_ratio * x.shape[-1], name="mlp")(nn.LayerNorm(name="ln2")(x)))


class DecoderLM(nn.Module):
    """tokens (B, T) int32 -> logits (B, T, vocab), T <= max_len."""

    vocab_size: int
    max_len: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        embed = nn.Embed(self.vocab_size, self.d_model, name="embed",
                         embedding_init=nn.initializers.normal(0.02))
        pos_table = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        if isinstance(tokens.shape[1], int) and tokens.shape[1] > self.max_len:
            raise TrainkitError(f"input has {tokens.shape[1]} tokens, more than model.max_len={self.max_len}")
        # A gather (not a slice) keeps the length symbolic under jax.export.
        x = embed(tokens) + jnp.take(pos_table, jnp.arange(tokens.shape[1]), axis=0)[None]
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for _ in range(self.num_layers):
            x = Block(self.num_heads, self.mlp_ratio, self.dropout)(x, train)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


def build(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> Task:
    """The next-token Task. config.model keys: d_model, num_heads, num_layers, mlp_ratio, max_len (default:
    the data's seq_len), dropout (default 0)."""
    max_len = int(config.get("max_len", 0) or info["seq_len"])
    if info["seq_len"] > max_len:
        raise TrainkitError(f"data.seq_len={info['seq_len']} exceeds model.max_len={max_len}; raise max_len")
    if config.d_model % config.num_heads:
        raise TrainkitError(
            f"model.d_model={config.d_model} is not divisible by model.num_heads={config.num_heads}"
        )
    module = DecoderLM(
        vocab_size=int(info["vocab_size"]),
        max_len=max_len,
        d_model=int(config.d_model),
        num_heads=int(config.num_heads),
        num_layers=int(config.num_layers),
        mlp_ratio=int(config.get("mlp_ratio", 4)),
        dropout=float(config.get("dropout", 0.0)),
    )
    return lm_task(module)


def lm_task(module: DecoderLM) -> Task:
    """A Task for `module(tokens) -> logits` on batches {"tokens": (B, T + 1) int32}."""

    def init(rng: jax.Array):
        return module.init(rng, jnp.zeros((1, module.max_len), jnp.int32))["params"]

    def predict(params, tokens):
        return module.apply({"params": params}, tokens)

    def per_token(params, batch, rng=None):
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        if rng is None:
            logits = predict(params, inputs)
        else:
            logits = module.apply({"params": params}, inputs, train=True, rngs={"dropout": rng})
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        return nll, correct

    def loss(params, batch, rng):
        nll, correct = per_token(params, batch, rng if module.dropout > 0 else None)
        mean = nll.mean()
        metrics = {"loss": mean, "accuracy": correct.mean(), "bits_per_byte": mean / np.log(2),
                   "perplexity": jnp.exp(mean)}
        return mean, metrics

    def evaluate(params, batch):
        # Per sequence: means over its tokens (a mean of per-sequence perplexities would not be a perplexity).
        nll, correct = per_token(params, batch)
        return {"loss": nll.mean(-1), "accuracy": correct.mean(-1), "bits_per_byte": nll.mean(-1) / np.log(2)}

    def example_inputs(seed: int, dims: Mapping[str, int]):
        rng = np.random.default_rng(seed)
        shape = (dims.get("batch", 2), dims.get("seq", min(module.max_len, 16)))
        return (rng.integers(0, module.vocab_size, shape).astype(np.int32),)

    return Task(
        name="transformer",
        init=init,
        loss=loss,
        evaluate=evaluate,
        predict=predict,
        inputs=(InputSpec("tokens", ("batch", "seq"), "int32"),),
        outputs=("logits",),
        example_inputs=example_inputs,
        sharding_rules=SHARDING_RULES,
    )
