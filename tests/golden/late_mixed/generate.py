"""Writes input.jsonl and the expected outputs of the 'late_mixed' golden case.

The input is 400 readings of 3 devices whose event times mostly move forward but now
and then jump back, some within the 2 s tolerance and some far beyond it. The expected
output follows the README's rule row by row, in arrival order, with no notion of
batches: a row is late when its 10 s window ends at or before the greatest event time
seen before it minus 2 s. Late rows go to expected_late.jsonl; every other row counts
in its window. Weir must give this output whatever its batch size.
"""

import json
import random

WINDOW_MS = 10_000
TOLERANCE_MS = 2_000

rng = random.Random(16)
rows = []
t = 0
for i in range(400):
    step = rng.choice([150, 250, 400, 600])
    t += step
    ts = t
    jump = rng.random()
    if jump < 0.15:
        ts = max(0, t - rng.randint(100, 1_900))  # behind, within the tolerance
    elif jump < 0.25:
        ts = max(0, t - rng.randint(2_500, 15_000))  # far behind: often late
    rows.append({"device": "dev-%d" % (i % 3), "ts": ts, "v": i})

windows = {}
late = []
newest = None
for row in rows:
    watermark = None if newest is None else newest - TOLERANCE_MS
    start = row["ts"] - row["ts"] % WINDOW_MS
    if watermark is not None and start + WINDOW_MS <= watermark:
        late.append(row)
    else:
        key = (start, row["device"])
        count, total = windows.get(key, (0, 0))
        windows[key] = (count + 1, total + row["v"])
    newest = row["ts"] if newest is None else max(newest, row["ts"])

with open("input.jsonl", "w") as f:
    for row in rows:
        f.write(json.dumps(row, separators=(",", ":")) + "\n")
with open("expected.jsonl", "w") as f:
    for (start, device), (count, total) in sorted(windows.items()):
        f.write(
            json.dumps(
                {
                    "window_start": start,
                    "window_end": start + WINDOW_MS,
                    "device": device,
                    "n": count,
                    "total": total,
                },
                separators=(",", ":"),
            )
            + "\n"
        )
with open("expected_late.jsonl", "w") as f:
    for row in late:
        f.write(json.dumps(row, separators=(",", ":")) + "\n")
print("%d rows, %d windows, %d late" % (len(rows), len(windows), len(late)))
