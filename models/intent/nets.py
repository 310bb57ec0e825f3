"""Model candidates for the intent classifier, trained in numpy over scipy sparse features.

Every candidate reads the same input, featurize.features_with_context(text, context): the
reply's hashed character n-grams in DIMS buckets, then the agent's last utterance's in
CONTEXT_DIMS more. Outputs are one sigmoid per label (an utterance may carry two intents),
or a softmax for the single-label baseline.
  * linear   — features → W → b (the model callbox shipped, now with context and sigmoids);
  * mlp      — features → W1 → ReLU → W2 (a hidden layer lets the context change a short
               reply's meaning: "yes" after an offer vs. after "can I call you later?");
Training: class-balanced binary cross-entropy (or softmax cross-entropy), mini-batch Adam,
L2, seeded.
"""

import numpy as np
import scipy.sparse as sp

import featurize


def matrix(rows):
    """CSR matrix [len(rows), INPUT_DIMS] of the rows' features."""
    indptr, indices, data = [0], [], []
    for r in rows:
        for k, v in featurize.features_with_context(r.text, r.context):
            indices.append(k)
            data.append(v)
        indptr.append(len(indices))
    return sp.csr_matrix((np.array(data, np.float32), np.array(indices, np.int32), np.array(indptr, np.int64)),
                         shape=(len(rows), featurize.INPUT_DIMS))


def targets(rows, labels):
    y = np.zeros((len(rows), len(labels)), np.float32)
    for i, r in enumerate(rows):
        for label in r.labels:
            y[i, labels.index(label)] = 1.0
    return y


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Adam:
    def __init__(self, params, lr):
        self.params, self.lr, self.t = params, lr, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads):
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= self.lr * (m / (1 - 0.9 ** self.t)) / (np.sqrt(v / (1 - 0.999 ** self.t)) + 1e-8)


def train(X, Y, hidden=0, output="sigmoid", l2=1e-5, epochs=8, batch=256, lr=3e-3, seed=7):
    """Returns the weights [W1, b1, (W2, b2)]. Class weights balance each label's positives
    against its negatives (sigmoid) or the classes against each other (softmax)."""
    rng = np.random.default_rng(seed)
    n, d = X.shape
    c = Y.shape[1]
    pos = Y.sum(axis=0)
    if output == "sigmoid":
        # Positives of a rare label weigh more, but no more than 20×: balanced to the hilt,
        # the rare labels would fire on half of everything.
        pos_weight = np.minimum((n - pos) / np.maximum(pos, 1), 20.0).astype(np.float32)
    else:
        class_weight = (n / (c * np.maximum(pos, 1))).astype(np.float32)
    if hidden:
        params = [(rng.standard_normal((d, hidden)) * 0.05).astype(np.float32), np.zeros(hidden, np.float32),
                  (rng.standard_normal((hidden, c)) * np.sqrt(2 / hidden)).astype(np.float32), np.zeros(c, np.float32)]
    else:
        params = [np.zeros((d, c), np.float32), np.zeros(c, np.float32)]
    opt = Adam(params, lr)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = X[idx], Y[idx]
            if hidden:
                h_pre = xb @ params[0] + params[1]
                h = np.maximum(h_pre, 0)
                z = h @ params[2] + params[3]
            else:
                z = xb @ params[0] + params[1]
            if output == "sigmoid":
                p = sigmoid(z)
                w = np.where(yb > 0, pos_weight, 1.0)
                g = (p - yb) * w / len(idx)
            else:
                p = softmax(z)
                w = (yb * class_weight).sum(axis=1, keepdims=True)
                g = (p - yb) * w / len(idx)
            if hidden:
                gW2 = h.T @ g + l2 * params[2]
                gb2 = g.sum(axis=0)
                gh = (g @ params[2].T) * (h_pre > 0)
                gW1 = np.asarray(xb.T @ gh) + l2 * params[0]
                gb1 = gh.sum(axis=0)
                opt.step([gW1, gb1, gW2, gb2])
            else:
                gW = np.asarray(xb.T @ g) + l2 * params[0]
                opt.step([gW, g.sum(axis=0)])
    return params


def probabilities(params, X, output="sigmoid"):
    if len(params) == 4:
        z = np.maximum(X @ params[0] + params[1], 0) @ params[2] + params[3]
    else:
        z = X @ params[0] + params[1]
    return sigmoid(z) if output == "sigmoid" else softmax(z)


def decide(probs, labels, threshold, other="other", other_wins=True):
    """Per row: every label at or above the threshold, best first; `other` alone when none
    is (or, with other_wins, when the best is `other`)."""
    out = []
    other_i = labels.index(other)
    for p in probs:
        order = np.argsort(-p)
        chosen = [labels[i] for i in order if p[i] >= threshold and i != other_i]
        if not chosen or (other_wins and order[0] == other_i):
            chosen = [other]
        out.append(chosen)
    return out


def export_onnx(params, path, n_labels, output="sigmoid", name="intent"):
    """indices[n] (int64), values[n] (float) → probabilities[1, n_labels]: the sparse
    features are gathered from the first layer's rows, so a reply costs n rows, not a
    dense product over every bucket (the reply has a few hundred features of 69,632)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    const = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("Gather", ["w1", "indices"], ["rows"], axis=0),
             helper.make_node("Unsqueeze", ["values", "axis1"], ["values_col"]),
             helper.make_node("Mul", ["rows", "values_col"], ["weighted"]),
             helper.make_node("ReduceSum", ["weighted", "axis0"], ["summed"], keepdims=1),
             helper.make_node("Add", ["summed", "b1"], ["layer1"])]
    weights = [numpy_helper.from_array(params[0].astype(np.float32), "w1"),
               numpy_helper.from_array(params[1].astype(np.float32), "b1")]
    last = "layer1"
    if len(params) == 4:
        nodes += [helper.make_node("Relu", ["layer1"], ["hidden"]),
                  helper.make_node("MatMul", ["hidden", "w2"], ["logits_raw"]),
                  helper.make_node("Add", ["logits_raw", "b2"], ["logits"])]
        weights += [numpy_helper.from_array(params[2].astype(np.float32), "w2"),
                    numpy_helper.from_array(params[3].astype(np.float32), "b2")]
        last = "logits"
    nodes.append(helper.make_node("Sigmoid", [last], ["probabilities"]) if output == "sigmoid"
                 else helper.make_node("Softmax", [last], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("values", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, n_labels])],
        weights + const)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="callbox-" + name)
    model.ir_version = 8
    onnx.checker.check_model(model)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def onnx_session(path):
    import onnxruntime
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def onnx_probabilities(session, text, context):
    """The exported model run by onnxruntime on one reply (the export's own check)."""
    feats = featurize.features_with_context(text, context) or [(0, 0.0)]
    out = session.run(None, {"indices": np.array([k for k, _ in feats], np.int64),
                             "values": np.array([v for _, v in feats], np.float32)})
    return out[0][0]
