#!/usr/bin/env python3
"""Writes input.jsonl and expected.jsonl of the golden case 'anomaly_zscore'.

The expected output comes from this script's own implementation of the zscore rule, not
from Weir: per device and 10 s tumbling window, the mean temperature; a window is an
anomaly when its device has at least 2 earlier windows and
|x - mean(earlier)| > 3 * stddev_pop(earlier). Values are chosen so that no window lies
near the threshold, which keeps the outcome independent of floating-point summation order.

Run from this directory: python3 generate.py
"""
import json
import math

START_MS = 1_767_225_600_000
DEVICES = ["dev-a", "dev-b", "dev-c"]
WINDOWS = 40
PER_WINDOW = 10  # one reading a second
# (device, window index) pairs whose readings are all shifted up.
SPIKES = {("dev-a", 12): 6.0, ("dev-b", 25): 9.0, ("dev-c", 3): 8.0, ("dev-c", 33): 7.0}


def lcg(seed):
    state = seed
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        yield ((state >> 33) % 1000) / 1000.0


def main():
    noise = lcg(42)
    readings = []
    for w in range(WINDOWS):
        for s in range(PER_WINDOW):
            ts = START_MS + (w * PER_WINDOW + s) * 1000
            for d, device in enumerate(DEVICES):
                value = 20.0 + d + (next(noise) - 0.5) * 1.0 + SPIKES.get((device, w), 0.0)
                readings.append({"device": device, "ts": ts, "temperature": round(value, 3)})
    with open("input.jsonl", "w") as out:
        for r in readings:
            out.write(json.dumps(r) + "\n")

    expected = []
    for device in DEVICES:
        means = []
        for w in range(WINDOWS):
            values = [r["temperature"] for r in readings
                      if r["device"] == device and (r["ts"] - START_MS) // 10_000 == w]
            means.append(sum(values) / len(values))
        for w, x in enumerate(means):
            earlier = means[:w]
            flag = False
            if len(earlier) >= 2:
                mean = sum(earlier) / len(earlier)
                std = math.sqrt(sum((v - mean) ** 2 for v in earlier) / len(earlier))
                z = abs(x - mean) / std if std > 0 else math.inf
                assert z < 2.5 or z > 3.5, f"{device} window {w} is too near the threshold: z={z}"
                flag = z > 3.0
            expected.append({"device": device, "window_start": START_MS + w * 10_000,
                             "is_anomaly": flag})
    with open("expected.jsonl", "w") as out:
        for row in expected:
            out.write(json.dumps(row) + "\n")
    flagged = [(r["device"], (r["window_start"] - START_MS) // 10_000) for r in expected if r["is_anomaly"]]
    print(f"{len(readings)} readings, {len(expected)} windows, anomalies: {flagged}")


main()
