"""Independent numpy versions of the CLIP text-transformer pieces, used as references by the tests."""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def activation(x, name):
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def causal_self_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    """x (B, L, C); weights in torch Linear layout (out, in); position i sees positions <= i only."""
    b, length, c = x.shape
    d = c // heads

    def split(t):
        return t.reshape(b, length, heads, d).transpose(0, 2, 1, 3)

    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    scores = np.where(np.triu(np.ones((length, length), bool), k=1), -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, c)
    return out @ wo.T + bo


def openclip_text_forward(sd, ids, heads, act="gelu"):
    """open_clip's text tower from its own state dict (in_proj, c_fc, ln_final ...).

    Returns (per-layer outputs list [embeddings, layer 1, ...], output after ln_final).
    """
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    states = [x]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{i}."
        wq, wk, wv = np.split(sd[p + "attn.in_proj_weight"], 3)
        bq, bk, bv = np.split(sd[p + "attn.in_proj_bias"], 3)
        h = layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + causal_self_attention(h, wq, bq, wk, bk, wv, bv, sd[p + "attn.out_proj.weight"],
                                      sd[p + "attn.out_proj.bias"], heads)
        h = layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = activation(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"], act)
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        states.append(x)
        i += 1
    return states, layer_norm(x, sd["ln_final.weight"], sd["ln_final.bias"])


def random_openclip_state_dict(rng, vocab, width, layers, mlp, proj, max_pos=77):
    """A random OpenCLIP text tower state dict (the SDXL TE2 layout, prefix stripped)."""
    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    sd = {"token_embedding.weight": r(vocab, width), "positional_embedding": r(max_pos, width),
          "ln_final.weight": 1 + r(width), "ln_final.bias": r(width), "text_projection": r(width, proj),
          "logit_scale": np.array(4.6052, np.float32)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                   p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
                   p + "mlp.c_fc.weight": r(mlp, width), p + "mlp.c_fc.bias": r(mlp),
                   p + "mlp.c_proj.weight": r(width, mlp), p + "mlp.c_proj.bias": r(width)})
    return sd
