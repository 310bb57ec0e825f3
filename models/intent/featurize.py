"""The intent featurizer, version charngram-fnv1a-v2 (v1 + the agent's last utterance). daemon/src/understanding/intent.rs is
its Rust twin; tests/intent.rs checks that both give the same features on the parity set.

v2 adds features_with_context: the reply's features as below in [0, DIMS), then the agent's
last utterance's in [DIMS, DIMS + CONTEXT_DIMS), hashed the same way modulo CONTEXT_DIMS;
each part L2-normalised on its own.

normalise: full-width ASCII → ASCII, ASCII upper → lower, anything not alphanumeric → one
space, spaces collapsed and trimmed. Features: character n-grams (n = 1..4) of
" " + text + " ", each hashed with 32-bit FNV-1a over its UTF-8 bytes into DIMS buckets;
counts, then L2-normalised.
"""

VERSION = "charngram-fnv1a-v2"
DIMS = 1 << 16
N_MIN, N_MAX = 1, 4
CONTEXT_DIMS = 1 << 12
INPUT_DIMS = DIMS + CONTEXT_DIMS


def normalise(text):
    out = []
    for c in text:
        o = ord(c)
        if 0xFF01 <= o <= 0xFF5E:
            c = chr(o - 0xFEE0)
        if "A" <= c <= "Z":
            c = c.lower()
        out.append(c if c.isalnum() else " ")
    return " ".join("".join(out).split())


def fnv1a(data):
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def features(text, dims=DIMS, offset=0):
    """Sorted (index, value) pairs."""
    norm = normalise(text)
    if not norm:
        return []
    chars = " " + norm + " "
    counts = {}
    for n in range(N_MIN, N_MAX + 1):
        for i in range(len(chars) - n + 1):
            k = offset + fnv1a(chars[i:i + n].encode("utf-8")) % dims
            counts[k] = counts.get(k, 0) + 1
    norm2 = sum(v * v for v in counts.values()) ** 0.5
    return sorted((k, v / norm2) for k, v in counts.items())


def features_with_context(text, context):
    """The reply's features in [0, DIMS), the agent's last utterance's in
    [DIMS, DIMS + CONTEXT_DIMS), each part L2-normalised on its own."""
    return features(text) + features(context, CONTEXT_DIMS, DIMS)
