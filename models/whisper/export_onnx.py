"""Builds Whisper encoder and decoder-step ONNX graphs from CTranslate2 weights (numpy + onnx).

Encoder  mel[1,80,frames] -> cross_k, cross_v [layers,1,frames/2,d]
         (the decoder's cross-attention keys and values, computed once per utterance; frames
         is symbolic so the runtime can fix it per length bucket instead of always paying for
         Whisper's 30-s window).
Decoder  one token per utterance per step, for a batch of B utterances decoded together (the
         weights are read once per step for all of them), as layers + 1 graphs with the
         cross-attention between them done by the caller (decoder_parts), and the
         self-attention cache of the tokens so far kept by the caller. `batch` and `past`
         are symbolic: one runtime plan per part serves every batch and length (its weights
         are held once), and each step attends to the tokens so far instead of a padded
         448-token context.
Weights are stored fp32: tract 0.23.9 keeps a Cast of an fp16 initializer in the graph and
re-runs it on every call (measured: ~200 ms per decoder step instead of tens), so widening
once here is what makes it fast.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
LN_EPS = 1e-5


class GraphBuilder:
    def __init__(self):
        self.nodes, self.inits, self.counter = [], [], 0
        self.const_cache = {}

    def name(self, hint):
        self.counter += 1
        return f"{hint}_{self.counter}"

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def weight(self, array, hint):
        """A float weight, widened from the checkpoint's fp16 to fp32 in the file."""
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def const(self, array, hint="c"):
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.const_cache:
            name = self.name(hint)
            self.inits.append(numpy_helper.from_array(array, name))
            self.const_cache[key] = name
        return self.const_cache[key]

    def linear(self, x, w, b, hint):
        # CTranslate2 stores [out, in]; MatMul wants [in, out].
        y = self.op("MatMul", [x, self.weight(w.T, hint + "_w")])
        return self.op("Add", [y, self.weight(b, hint + "_b")]) if b is not None else y

    def scoped_linear(self, x, v, scope, hint):
        """linear() over CTranslate2's `scope/weight` and `scope/bias`."""
        return self.linear(x, v[scope + "/weight"], v[scope + "/bias"], hint)

    def unsqueeze0(self, x):
        return self.op("Unsqueeze", [x, self.const(np.array([0], np.int64))])

    def residual_ffn(self, x, v, layer, tag):
        """x + linear_1(gelu(linear_0(layer_norm(x)))), the block both stacks share."""
        h = self.layer_norm(x, v, layer + "/ffn/layer_norm")
        h = self.gelu(self.scoped_linear(h, v, layer + "/ffn/linear_0", tag + "_f0"))
        return self.op("Add", [x, self.scoped_linear(h, v, layer + "/ffn/linear_1", tag + "_f1")])

    def layer_norm(self, x, v, scope):
        mean = self.op("ReduceMean", [x], axes=[-1], keepdims=1)
        centred = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Mul", [centred, centred])], axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(np.float32(LN_EPS))])])
        normed = self.op("Div", [centred, std])
        scaled = self.op("Mul", [normed, self.weight(v[scope + "/gamma"], scope + "_g")])
        return self.op("Add", [scaled, self.weight(v[scope + "/beta"], scope + "_b")])

    def gelu(self, x):
        # Exact (erf) GELU, as Whisper uses.
        inner = self.op("Erf", [self.op("Mul", [x, self.const(np.float32(1 / np.sqrt(2)))])])
        return self.op("Mul", [self.op("Mul", [x, self.const(np.float32(0.5))]),
                               self.op("Add", [inner, self.const(np.float32(1.0))])])

    def heads(self, x, n_heads, d_head):
        """[B,T,d] -> [B,H,T,dh] (0 in a Reshape keeps the batch dimension as it is)"""
        r = self.op("Reshape", [x, self.const(np.array([0, -1, n_heads, d_head], np.int64))])
        return self.op("Transpose", [r], perm=[0, 2, 1, 3])

    def merge_heads(self, x, d_model):
        t = self.op("Transpose", [x], perm=[0, 2, 1, 3])
        return self.op("Reshape", [t, self.const(np.array([0, -1, d_model], np.int64))])

    def attention(self, q, k, v, n_heads, d_model, mask=None):
        """mask: [B,1,1,T], added to the scores (0 where attended, a large negative where not)."""
        d_head = d_model // n_heads
        qh, kh, vh = (self.heads(t, n_heads, d_head) for t in (q, k, v))
        kt = self.op("Transpose", [kh], perm=[0, 1, 3, 2])
        scores = self.op("Mul", [self.op("MatMul", [qh, kt]), self.const(np.float32(1 / np.sqrt(d_head)))])
        if mask is not None:
            scores = self.op("Add", [scores, mask])
        probs = self.op("Softmax", [scores], axis=-1)
        return self.merge_heads(self.op("MatMul", [probs, vh]), d_model)

    def split_last(self, x, sizes):
        outs = [self.name("split") for _ in sizes]
        self.nodes.append(helper.make_node("Split", [x, self.const(np.array(sizes, np.int64))], outs, axis=-1))
        return outs

    def model(self, inputs, outputs, name):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="callbox-models")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def dims(v):
    d_model = v["encoder/position_encodings/encodings"].shape[1]
    n_heads = int(v["encoder/num_heads"])
    enc_layers = sum(1 for k in v if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    dec_layers = sum(1 for k in v if k.startswith("decoder/layer_") and k.endswith("ffn/linear_0/weight"))
    return d_model, n_heads, enc_layers, dec_layers


def encoder(v):
    d_model, n_heads, enc_layers, dec_layers = dims(v)
    n_mels = v["encoder/conv1/weight"].shape[1]
    g = GraphBuilder()
    x = g.op("Conv", ["mel", g.weight(v["encoder/conv1/weight"], "conv1_w"), g.weight(v["encoder/conv1/bias"], "conv1_b")],
             kernel_shape=[3], pads=[1, 1])
    x = g.gelu(x)
    x = g.op("Conv", [x, g.weight(v["encoder/conv2/weight"], "conv2_w"), g.weight(v["encoder/conv2/bias"], "conv2_b")],
             kernel_shape=[3], pads=[1, 1], strides=[2])
    x = g.op("Transpose", [g.gelu(x)], perm=[0, 2, 1])  # [1,T,d]
    length = g.op("Shape", [x], start=1, end=2)
    pos = g.op("Slice", [g.weight(v["encoder/position_encodings/encodings"], "enc_pos"),
                         g.const(np.array([0], np.int64)), length, g.const(np.array([0], np.int64))])
    x = g.op("Add", [x, pos])
    for i in range(enc_layers):
        s = f"encoder/layer_{i}"
        h = g.layer_norm(x, v, s + "/self_attention/layer_norm")
        qkv = g.scoped_linear(h, v, s + "/self_attention/linear_0", f"e{i}_qkv")
        q, k, val = g.split_last(qkv, [d_model] * 3)
        a = g.attention(q, k, val, n_heads, d_model)
        x = g.op("Add", [x, g.scoped_linear(a, v, s + "/self_attention/linear_1", f"e{i}_o")])
        x = g.residual_ffn(x, v, s, f"e{i}")
    x = g.layer_norm(x, v, "encoder/layer_norm")
    ks, vs = [], []
    for i in range(dec_layers):
        kv = g.scoped_linear(x, v, f"decoder/layer_{i}/attention/linear_1", f"x{i}_kv")
        k, val = g.split_last(kv, [d_model, d_model])
        ks.append(g.unsqueeze0(k))
        vs.append(g.unsqueeze0(val))
    g.nodes.append(helper.make_node("Concat", ks, ["cross_k"], axis=0))
    g.nodes.append(helper.make_node("Concat", vs, ["cross_v"], axis=0))
    inputs = [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, n_mels, "frames"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dec_layers, 1, "enc_len", d_model])
               for n in ("cross_k", "cross_v")]
    return g.model(inputs, outputs, "whisper_encoder")


def decoder_parts(v):
    """The decoder step as dec_layers + 1 graphs, with cross-attention left to the caller.

    Part 0:       token[B], position[B], self_k/self_v [B,past,d], self_mask[B,past+1]
                  -> x, query, new_k, new_v  (each [B,d])
    Part l (1..): x, cross[B,d] (layer l-1's cross-attention output), layer l's cache
                  -> x, query, new_k, new_v
    Part L:       x, cross -> logits[B,vocab]

    Part l ends layer l-1 (its cross-attention output projection and feed-forward block) and
    runs layer l's self-attention up to its cross-attention query (bias included, not
    scaled). The caller attends each row's query to its own window's keys and values (the
    encoder's cross_k/cross_v, unpadded) per head. In one graph tract packs every row's
    cross-attention keys and values again on every step (they are runtime inputs, not
    weights): measured, that was ~4 ms of a 17-ms step on a 6-s window, growing with the
    window and with every row of a batch, where the caller's plain loops read them once.
    Rows of a batch are padded on the left of their self-attention history and masked
    (self_mask: 0 where a row attends, -1e9 on its padding)."""
    d_model, n_heads, enc_layers, dec_layers = dims(v)
    d_head = d_model // n_heads
    f = TensorProto.FLOAT
    rows = lambda name: helper.make_tensor_value_info(name, f, ["batch", d_model])  # noqa: E731

    def start_layer(g, x, i):
        """Layer i from its input x [B,d] to its cross-attention query; self-attention here."""
        s = f"decoder/layer_{i}"
        axis1 = g.const(np.array([1], np.int64))
        h = g.layer_norm(x, v, s + "/self_attention/layer_norm")
        qkv = g.scoped_linear(h, v, s + "/self_attention/linear_0", f"d{i}_qkv")
        q, k, val = g.split_last(qkv, [d_model] * 3)
        # The tokens so far ([B,past,d]) and this one.
        all_k = g.op("Concat", ["self_k", g.op("Unsqueeze", [k, axis1])], axis=1)
        all_v = g.op("Concat", ["self_v", g.op("Unsqueeze", [val, axis1])], axis=1)
        mask = g.op("Unsqueeze", ["self_mask", g.const(np.array([1, 2], np.int64))])  # [B,1,1,T]
        qh = g.op("Unsqueeze", [g.op("Reshape", [q, g.const(np.array([0, n_heads, d_head], np.int64))]),
                                g.const(np.array([2], np.int64))])  # [B,H,1,dh]
        kh, vh = g.heads(all_k, n_heads, d_head), g.heads(all_v, n_heads, d_head)  # [B,H,T,dh]
        scores = g.op("Mul", [g.op("MatMul", [qh, g.op("Transpose", [kh], perm=[0, 1, 3, 2])]),
                              g.const(np.float32(1 / np.sqrt(d_head)))])
        probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
        a = g.op("Reshape", [g.op("MatMul", [probs, vh]), g.const(np.array([0, d_model], np.int64))])
        x = g.op("Add", [x, g.scoped_linear(a, v, s + "/self_attention/linear_1", f"d{i}_o")])
        h = g.layer_norm(x, v, s + "/attention/layer_norm")
        query = g.scoped_linear(h, v, s + "/attention/linear_0", f"d{i}_xq")
        return x, query, k, val

    def end_layer(g, x, i):
        """Layer i from after its self-attention, given its cross-attention output `cross`."""
        s = f"decoder/layer_{i}"
        x = g.op("Add", [x, g.scoped_linear("cross", v, s + "/attention/linear_2", f"d{i}_xo")])
        return g.residual_ffn(x, v, s, f"d{i}")

    cache_inputs = [
        helper.make_tensor_value_info("self_k", f, ["batch", "past", d_model]),
        helper.make_tensor_value_info("self_v", f, ["batch", "past", d_model]),
        helper.make_tensor_value_info("self_mask", f, ["batch", "past_and_new"]),
    ]
    parts = []
    for part in range(dec_layers + 1):
        g = GraphBuilder()
        if part == 0:
            # The running state is [B,d]: every weight product is one [B,d]x[d,n] matrix
            # product for the whole batch. (A [B,1,d] state measured the same in tract; what
            # made a batch of 8 cost 8 single steps was the in-graph cross-attention.)
            tok = g.op("Gather", [g.weight(v["decoder/embeddings/weight"], "tok_emb"), "token"], axis=0)
            pos = g.op("Gather", [g.weight(v["decoder/position_encodings/encodings"], "dec_pos"), "position"], axis=0)
            x = g.op("Add", [tok, pos])
            inputs = [helper.make_tensor_value_info("token", TensorProto.INT64, ["batch"]),
                      helper.make_tensor_value_info("position", TensorProto.INT64, ["batch"])]
        else:
            x = end_layer(g, "x", part - 1)
            inputs = [rows("x"), rows("cross")]
        if part < dec_layers:
            x, query, k, val = start_layer(g, x, part)
            for name, value in (("x_out", x), ("query", query), ("new_k", k), ("new_v", val)):
                g.nodes.append(helper.make_node("Identity", [value], [name]))
            inputs += cache_inputs
            outputs = [rows(n) for n in ("x_out", "query", "new_k", "new_v")]
        else:
            x = g.layer_norm(x, v, "decoder/layer_norm")
            # Output projection tied to the embedding, stored again pre-transposed: with
            # Gemm(transB) on the shared initializer tract re-packs the 51865×512 matrix on
            # every step.
            vocab = v["decoder/embeddings/weight"].shape[0]
            g.nodes.append(helper.make_node("MatMul", [x, g.weight(v["decoder/embeddings/weight"].T, "tok_proj")],
                                            ["logits"]))
            outputs = [helper.make_tensor_value_info("logits", f, ["batch", vocab])]
        parts.append(g.model(inputs, outputs, f"whisper_decoder_part_{part}"))
    return parts
