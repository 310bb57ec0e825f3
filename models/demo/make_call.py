"""Builds the sample two-leg call that `callbox demo` streams into the daemon.

Each line of the dialogue below is spoken by espeak-ng (English: its Mandarin voices are not
intelligible to Whisper, see README) and placed on its leg's channel of one stereo WAV, agent
left and customer right, one line after another with a short gap, as a telephone call sounds.
Standard library only; writes <out>/call.wav and <out>/call.txt (the script with times).
Usage: python3 make_call.py --out DIR
"""
import argparse
import array
import os
import subprocess
import sys
import tempfile
import wave

# (leg, text): the call exercises the shipped rules. The agent gives the recording notice,
# then promises a guaranteed return (supervisor_alert); the customer asks the price, asks
# for customisation three times (high_value_lead), for a real person (transfer_to_human) and
# not to be called again (dnc_request).
DIALOGUE = [
    ("agent", "Hello, this is Lisa from Sunrise Wealth. This call is recorded for quality purposes."),
    ("customer", "Hi. What is this about?"),
    ("agent", "We have a new savings plan for small business owners."),
    ("customer", "How much does it cost per month?"),
    ("agent", "It is ninety nine dollars a month."),
    ("customer", "Can you customize the plan for my shop?"),
    ("agent", "Yes, we can adjust it for you."),
    ("customer", "Could you customize the reports as well?"),
    ("agent", "Of course. And our fund is a guaranteed return, with no risk at all."),
    ("customer", "Can I customize the payment dates too?"),
    ("agent", "Sure, any date you like."),
    ("customer", "Actually, I want to talk to a real person. And please stop calling me after this."),
    ("agent", "I understand. Goodbye."),
]
GAP_SECS = 0.8
LEAD_SECS = 0.5
SPEED_WPM = "155"


def speak(text, path):
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", SPEED_WPM, "-w", path, text], check=True)
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            sys.exit(f"espeak-ng wrote an unexpected format to {path}")
        return w.getframerate(), array.array("h", w.readframes(w.getnframes()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rate = None
    placed = []  # (leg, start sample, samples, text)
    cursor = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (leg, text) in enumerate(DIALOGUE):
            r, samples = speak(text, os.path.join(tmp, f"{i}.wav"))
            if rate is None:
                rate = r
                cursor = int(LEAD_SECS * rate)
            elif r != rate:
                sys.exit("espeak-ng changed its sample rate between lines")
            placed.append((leg, cursor, samples, text))
            cursor += len(samples) + int(GAP_SECS * rate)
    total = cursor
    stereo = array.array("h", bytes(4 * total))
    for leg, start, samples, _ in placed:
        channel = 0 if leg == "agent" else 1
        for j, s in enumerate(samples):
            stereo[2 * (start + j) + channel] = s
    with wave.open(os.path.join(args.out, "call.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(stereo.tobytes())
    with open(os.path.join(args.out, "call.txt"), "w", encoding="utf-8") as f:
        for leg, start, samples, text in placed:
            f.write(f"{start / rate:6.2f}\t{(start + len(samples)) / rate:6.2f}\t{leg}\t{text}\n")
    print(f"demo call: {total / rate:.1f} s, {len(placed)} lines -> {args.out}/call.wav")


if __name__ == "__main__":
    main()
