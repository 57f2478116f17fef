"""Hugging Face Flax models from small configs (random init, nothing downloaded), token ids with symbolic batch
and sequence axes."""

from __future__ import annotations

import numpy as np

from . import Case, case, cast, rng

# No offline switch in os.environ here: it would leak into every later test's subprocesses (the hf:// source
# tests need the Hub client online against their local server). Models built from configs download nothing.


def _ids(seed, batch, seq, vocab):
    return rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


@case("hf_gpt2_lm")
def gpt2(dtype):
    from transformers import FlaxGPT2LMHeadModel, GPT2Config
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = FlaxGPT2LMHeadModel(config, seed=0, dtype=np.dtype(dtype))
    params = cast(model.params, dtype)

    def fn(p, ids):
        return model(ids, params=p).logits
    # GPT-2 cuts its 64-position causal mask to the sequence (min(64, seq)): the bound makes that traceable
    return Case("", fn, params, (_ids(1, 2, 7, 100),), (_ids(2, 3, 12, 100),), [{0: "batch", 1: "seq"}],
                dim_constraints=("seq <= 64",))


@case("hf_bert")
def bert(dtype):
    from transformers import BertConfig, FlaxBertModel
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = FlaxBertModel(config, seed=0, dtype=np.dtype(dtype))
    params = cast(model.params, dtype)

    def fn(p, ids, mask):
        out = model(ids, attention_mask=mask, params=p)
        return out.last_hidden_state, out.pooler_output
    m1 = np.ones((2, 7), np.int32)
    m1[1, 5:] = 0
    m2 = np.ones((3, 12), np.int32)
    m2[0, 9:] = 0
    return Case("", fn, params, (_ids(3, 2, 7, 100), m1), (_ids(4, 3, 12, 100), m2),
                [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}])
