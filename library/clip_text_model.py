"""CLIP text encoders for SDXL: CLIP-L (`CLIPTextModel`) and OpenCLIP bigG (`CLIPTextModelWithProjection`).

Same layout and parameter names as HF transformers' CLIP text models, so a checkpoint's keys map 1:1 onto
`parameters_and_names()` (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...). We write our own rather
than use mindone's because mindone's cells name parameters `gamma`/`beta`/`embedding_table` and its loader is not
strict. The LoRA network finds `CLIPAttention` / `CLIPMLP` cells by class name, as upstream does, and swaps their
`nn.Dense` attributes (`q_proj`, ..., `fc2`) for LoRA cells, so those names and attributes are part of the API.

Outputs are tuples (graph mode):
- `CLIPTextModel(input_ids)` -> `(last_hidden_state, pooled_output, hidden_states)`
- `CLIPTextModelWithProjection(input_ids)` -> `(text_embeds, last_hidden_state, hidden_states)`
`hidden_states` holds the embeddings output and every layer's output (num_hidden_layers + 1 tensors, none of
them through the final LayerNorm), so `hidden_states[-2]` is the penultimate layer that SDXL conditions on.
"""

import logging

from mindspore import nn, ops

from library.graph_reuse import GraphEntry, ReusedCell
from library.layers import Embedding, LayerNorm, attention, causal_mask, dense

logger = logging.getLogger(__name__)


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


def gelu(x):
    return ops.gelu(x, approximate="none")  # exact erf form, as torch's default GELU


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int):
        super().__init__()
        self.token_embedding = Embedding(vocab_size, hidden_size)
        self.position_embedding = Embedding(max_position_embeddings, hidden_size)

    def construct(self, input_ids):
        seq_len = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:seq_len]


class CLIPAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_attention_heads: int):
        super().__init__()
        if hidden_size % num_attention_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        self.num_heads = num_attention_heads
        self.q_proj = dense(hidden_size, hidden_size)
        self.k_proj = dense(hidden_size, hidden_size)
        self.v_proj = dense(hidden_size, hidden_size)
        self.out_proj = dense(hidden_size, hidden_size)

    def construct(self, hidden_states, mask):
        out = attention(self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                        self.num_heads, mask)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {hidden_act!r}")
        self.act = ACTIVATIONS[hidden_act]
        self.fc1 = dense(hidden_size, intermediate_size)
        self.fc2 = dense(intermediate_size, hidden_size)

    def construct(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


class CLIPEncoderLayer(ReusedCell):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size, intermediate_size, num_attention_heads, hidden_act, layer_norm_eps):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_attention_heads)
        self.layer_norm1 = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act)
        self.layer_norm2 = LayerNorm(hidden_size, eps=layer_norm_eps)

    def construct(self, hidden_states, mask):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Cell):
    def __init__(self, num_hidden_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(**layer_kwargs) for _ in range(num_hidden_layers)])

    def construct(self, hidden_states, mask):
        all_states = (hidden_states,)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
            all_states = all_states + (hidden_states,)
        return all_states


class CLIPTextTransformer(GraphEntry):  # a top-level graph when called as `te.text_model(ids)`
    def __init__(self, vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_attention_heads=num_attention_heads, hidden_act=hidden_act,
                                   layer_norm_eps=layer_norm_eps)
        self.final_layer_norm = LayerNorm(hidden_size, eps=layer_norm_eps)
        # a constant, not a parameter: checkpoints' `position_ids` buffers are dropped on load
        self.causal_mask = causal_mask(max_position_embeddings)

    def construct(self, input_ids):
        seq_len = input_ids.shape[-1]
        hidden_states = self.encoder(self.embeddings(input_ids), self.causal_mask[:, :, :seq_len, :seq_len])
        last_hidden_state = self.final_layer_norm(hidden_states[-1])
        # HF's pooling: the position of the highest id, i.e. the first end token (49407 is the largest id)
        eos_index = ops.argmax(input_ids, dim=-1)
        pooled_output = ops.gather(last_hidden_state, eos_index, 1, batch_dims=1)
        return last_hidden_state, pooled_output, hidden_states


class _CLIPTextModelBase(GraphEntry):
    def __init__(self, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                 max_position_embeddings, hidden_act, layer_norm_eps):
        super().__init__()
        self.text_model = CLIPTextTransformer(vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                                              num_attention_heads, max_position_embeddings, hidden_act, layer_norm_eps)
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each encoder layer's activations in the backward pass instead of keeping them.

        MindSpore's `Cell.recompute()` cannot be undone, so turning it off after turning it on is refused.
        """
        layers = self.text_model.encoder.layers
        if not enabled:
            if self.gradient_checkpointing:
                raise ValueError("gradient checkpointing cannot be switched off once on "
                                 "(MindSpore's recompute is one-way)")
            return
        if not self.gradient_checkpointing:
            for layer in layers:
                layer.recompute()
            self.gradient_checkpointing = True
            logger.info(f"{type(self).__name__}: gradient checkpointing on for {len(layers)} layers")


class CLIPTextModel(_CLIPTextModelBase):
    """CLIP-L text encoder (SDXL's TE1). Keyword arguments are HF `CLIPTextConfig` names.

    construct(input_ids (B, L) int) -> (last_hidden_state (B, L, C), pooled_output (B, C), hidden_states tuple)
    """

    def __init__(self, vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5):
        super().__init__(vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                         max_position_embeddings, hidden_act, layer_norm_eps)

    def construct(self, input_ids):
        return self.text_model(input_ids)


class CLIPTextModelWithProjection(_CLIPTextModelBase):
    """OpenCLIP bigG text encoder in HF layout (SDXL's TE2). Defaults are bigG's.

    construct(input_ids (B, L) int) -> (text_embeds (B, P), last_hidden_state (B, L, C), hidden_states tuple),
    text_embeds = text_projection(HF-pooled output); SDXL training pools differently, see sdxl_text_encoding.
    """

    def __init__(self, vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                 projection_dim=1280):
        super().__init__(vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                         max_position_embeddings, hidden_act, layer_norm_eps)
        self.text_projection = dense(hidden_size, projection_dim, bias=False)

    def construct(self, input_ids):
        last_hidden_state, pooled_output, hidden_states = self.text_model(input_ids)
        return self.text_projection(pooled_output), last_hidden_state, hidden_states
