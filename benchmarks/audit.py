"""`defectscope audit export` and `audit verify` on long audit trails: time and peak memory by trail length.

    python benchmarks/audit.py --records 100000 500000 2000000

Writes an audit database of each length (records as a hot folder writes them, 5,000 a transaction),
then exports it to Parquet in a fresh process, whose peak memory is its own, and verifies its chain in another. Writes
benchmarks/results/audit-export.json and audit-export.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from isolated import markdown_table, peak_mb, run_isolated, write_results

from defectscope.clock import now
from defectscope.line.audit import AuditLog, Verdict, export_parquet, verify_chain

BATCH = 5000
COLUMNS = (("records", "records", "{:,}"), ("database_mb", "database MB", "{:.0f}"), ("parquet_mb", "Parquet MB", "{:.1f}"),
           ("export_s", "export s", "{:.1f}"), ("records_per_s", "records/s", "{:,.0f}"), ("peak_mb", "export peak MB", "{:.0f}"),
           ("write_s", "write s", "{:.1f}"), ("verify_s", "verify s", "{:.1f}"), ("verify_peak_mb", "verify peak MB", "{:.0f}"))


def write_trail(database: Path, records: int) -> None:
    """An audit database of `records` verdicts, every field filled."""
    log = AuditLog(database)
    for start in range(0, records, BATCH):
        log.record([Verdict(time=now(), model="bottle", model_version="3", model_sha256="a" * 64, threshold=27.5,
                            stated_rate=0.01, image_sha256=f"{index:064x}", image_name=f"cam1_{index:09d}.png",
                            width=900, height=900, source="hot folder", score=20.0 + index % 97 / 10,
                            normalized=(20.0 + index % 97 / 10) / 27.5, verdict="good" if index % 97 < 75 else "defective",
                            regions=0, role="operator") for index in range(start, min(records, start + BATCH))])
    log.close()


def export(database: Path, out: Path) -> dict:
    """One export, timed, with this process's peak memory."""
    start = time.perf_counter()
    count = export_parquet(database, out)
    return {"records": count, "export_s": time.perf_counter() - start, "peak_mb": peak_mb()}


def verify(database: Path) -> dict:
    """One verification of the chain, timed, with this process's peak memory."""
    start = time.perf_counter()
    found = verify_chain(database)
    if found.broken is not None or found.unchained:
        sys.exit(f"the chain of {database} does not hold: {found}")
    return {"verify_s": time.perf_counter() - start, "verify_peak_mb": peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 500_000, 2_000_000])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for records in args.records:
            database, out = Path(scratch) / f"audit-{records}.sqlite", Path(scratch) / f"audit-{records}.parquet"
            start = time.perf_counter()
            write_trail(database, records)
            written = time.perf_counter() - start
            row = run_isolated(__file__, ["--export", str(database), str(out)], f"export of {records:,} records")
            checked = run_isolated(__file__, ["--verify", str(database)], f"verification of {records:,} records")
            rows.append({**row, **checked, "write_s": written, "database_mb": database.stat().st_size / 2**20,
                         "parquet_mb": out.stat().st_size / 2**20, "records_per_s": row["records"] / row["export_s"]})
            database.unlink()
            out.unlink()
    write_results(args.out, "audit-export", rows, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--export"]:
        print(json.dumps(export(Path(sys.argv[2]), Path(sys.argv[3]))))
    elif sys.argv[1:2] == ["--verify"]:
        print(json.dumps(verify(Path(sys.argv[2]))))
    else:
        main()
