"""Compare PatchCore frame, patch-grid and memory candidates on several categories in one table (accuracy and cost).

    python benchmarks/frames.py --root ../shared/datasets/mvtec_ad --categories bottle ../mvtec_3d_ad_rgb/tire

Each (candidate, category) is measured by benchmarks/mvtec.py in a fresh process. Writes
benchmarks/results/frames.json and frames.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from isolated import run_isolated, write_results

CANDIDATES = {
    "288/256, patch stride 8, coreset 10% (before)": {"image_size": 288, "crop": 256, "patch_stride": 8},
    "288/256, patch stride 16, coreset 10%": {"image_size": 288, "crop": 256},
    "352/320, patch stride 8, coreset 2%": {"patch_stride": 8, "coreset_ratio": 0.02},
    "352/320, patch stride 16, coreset 10% (default)": {},
    "352/320, patch stride 16, coreset 5%": {"coreset_ratio": 0.05},
    "416/384, patch stride 16, coreset 10%": {"image_size": 416, "crop": 384},
}
COLUMNS = (("candidate", "{}"), ("category", "{}"), ("image_auroc", "{:.3f}"), ("pixel_auroc", "{:.3f}"), ("aupro", "{:.3f}"),
           ("recall", "{:.3f}"), ("fit_s", "{:.1f}"), ("ms_batch1", "{:.0f}"), ("ms_batched", "{:.0f}"), ("peak_mb", "{:.0f}"))


def markdown(rows: list[dict]) -> str:
    header = "| candidate | category | image AUROC | pixel AUROC | AUPRO | recall at 1% FAR | fit s | ms/img batch 1 | ms/img batch 32 | peak MB |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for key, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/datasets/mvtec_ad"))
    parser.add_argument("--categories", nargs="+", default=["bottle", "../mvtec_3d_ad_rgb/tire"])
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    script = str(Path(__file__).with_name("mvtec.py"))
    rows = []
    for name in args.candidates:
        for category in args.categories:
            folder = args.root / category
            measured = run_isolated(script, ["--settings", json.dumps(CANDIDATES[name]), "--single", str(folder), "patchcore"],
                                    f"{name}/{folder.name}")
            rows.append({"candidate": name, "settings": CANDIDATES[name], **measured})
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    write_results(args.out, "frames", rows, table)


if __name__ == "__main__":
    main()
