"""W1 in DuckDB, for the benchmark to time beside Weir (benches/w1/cores.rs).

Usage: python3 duckdb_w1.py INPUT OUTPUT THREADS

Reads the W1 JSON lines, computes every device's 10 s tumbling-window aggregates and the
zscore anomaly flag over the device's earlier windows (the rule of reference.rs), and
writes JSON lines the benchmark checks against the hand-written floor. Prints the time
the query took, from connecting to the output being written, as `seconds=S`; the Python
start-up and the import of duckdb are not counted.
"""

import sys
import time

import duckdb

WINDOW_MS = 10_000
MIN_HISTORY = 2
THRESHOLD = 3.0


def main() -> None:
    source, target, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    started = time.perf_counter()
    con = duckdb.connect(config={"threads": threads})
    con.execute(
        f"""
        COPY (
          WITH windows AS (
            SELECT device,
                   ts - ts % {WINDOW_MS} AS window_start,
                   count(*) AS "count",
                   avg(temperature) AS avg_temperature,
                   min(temperature) AS min_temperature,
                   max(temperature) AS max_temperature,
                   avg(humidity) AS avg_humidity
            FROM read_json(?, format = 'newline_delimited',
                           columns = {{device: 'VARCHAR', ts: 'BIGINT',
                                      temperature: 'DOUBLE', humidity: 'DOUBLE'}})
            GROUP BY ALL
          )
          SELECT window_start, window_start + {WINDOW_MS} AS window_end, device, "count",
                 avg_temperature, min_temperature, max_temperature, avg_humidity,
                 coalesce(count(*) OVER earlier >= {MIN_HISTORY}
                          AND abs(avg_temperature - avg(avg_temperature) OVER earlier)
                              > {THRESHOLD} * stddev_pop(avg_temperature) OVER earlier,
                          false) AS anomaly
          FROM windows
          WINDOW earlier AS (PARTITION BY device ORDER BY window_start
                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
        ) TO '{target.replace("'", "''")}' (FORMAT JSON)
        """,
        [source],
    )
    con.close()
    print(f"seconds={time.perf_counter() - started:.6f}")


if __name__ == "__main__":
    main()
