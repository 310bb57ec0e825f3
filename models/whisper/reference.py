"""Reference implementations in numpy, used to check the Rust code and the ONNX export.

log_mel: Whisper's log_mel_spectrogram (openai-whisper 20250625, whisper/audio.py) with
torch.stft's defaults written out: centred frames, reflect padding, periodic Hann window,
the last frame dropped; mel filters from the package's own mel_filters.npz.
"""

import numpy as np

N_FFT, HOP = 400, 160


def log_mel(audio, filters, padding=0):
    audio = np.asarray(audio, np.float32)
    if padding:
        audio = np.concatenate([audio, np.zeros(padding, np.float32)])
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    frames = 1 + (len(padded) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    spectrum = np.fft.rfft(padded[idx] * window, axis=1)  # [frames, 201]
    power = (np.abs(spectrum) ** 2).T[:, :-1]
    mel = filters @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def bytes_to_unicode():
    """GPT-2's byte <-> printable character table, which Whisper's vocabulary uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def detokenize(vocab, ids):
    table = bytes_to_unicode()
    raw = bytearray()
    for i in ids:
        raw.extend(table[ch] for ch in vocab[i])
    return raw.decode("utf-8", errors="replace")
