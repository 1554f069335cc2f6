"""PatchCore's frame candidates, the frame search that chooses among them, and the coreset, on every category.

    python benchmarks/frames.py --root ../shared/datasets --categories mvtec_ad/bottle mvtec_3d_ad_rgb/tire \
        --generate rotated-parts fine-defects threaded-parts

Rows: each candidate frame pinned (with the coreset ratio the search gives it: equal memory rows per image); the default (the frame chosen per product by the good-only search);
the same with `rotations` (the memory also learns each good image turned); and the 352/320 s16 frame with one global greedy coreset over all patches (`coreset_candidates` 10 with
the 10% ratio) beside the default merge-and-reduce coreset. Each (row, category) is measured by
benchmarks/mvtec.py in a fresh process. Writes benchmarks/results/frames.json and frames.md; with
--keep-others only the given --candidates are measured again and the other rows are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from generated import CATEGORIES as GENERATED, write_generated
from isolated import keep_other_rows, markdown_table, run_isolated, runs_note, write_results

from defectscope.detectors.frame_search import CANDIDATES as FRAMES
from defectscope.detectors.frame_search import frame_settings
from defectscope.detectors.patchcore import PatchCoreConfig

DEFAULT = "default: frame chosen by the search"
GLOBAL = "352/320 s16, one global greedy coreset"
TURNS = "frame chosen by the search, rotations: true"
CANDIDATES = {DEFAULT: {}, TURNS: {"rotations": True}, GLOBAL: {**FRAMES["352/320 s16"], "coreset_candidates": 10.0},
              **{f"{name} (pinned)": frame_settings(name, PatchCoreConfig()) for name in FRAMES}}
COLUMNS = (("candidate", "candidate", "{}"), ("category", "category", "{}"), ("frame", "frame", "{}"),
           ("image_auroc", "image AUROC", "{:.3f}"), ("pixel_auroc", "pixel AUROC", "{:.3f}"), ("aupro", "AUPRO", "{:.3f}"),
           ("recall", "recall at 1%", "{:.3f}"), ("test_far", "FAR on good test at 1%", "{:.1%}"),
           ("recall_5", "recall at 5%", "{:.3f}"), ("bias", "calibration bias (sd)", "{:+.2f}"), ("bias_se", "± (1 se)", "{:.2f}"),
           ("fit_s", "fit s", "{:.1f}"), ("ms_batch1", "ms/img batch 1", "{:.0f}"), ("ms_batched", "ms/img batched", "{:.0f}"),
           ("peak_mb", "peak MB", "{:.0f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--categories", nargs="*", default=["mvtec_ad/bottle", "mvtec_3d_ad_rgb/tire"])
    parser.add_argument("--generate", nargs="*", default=["rotated-parts", "fine-defects", "threaded-parts"],
                        choices=GENERATED)
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--keep-others", action="store_true",
                        help="re-measure only --candidates; keep the other rows of OUT/frames.json (each row names its run)")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory()  # the generated categories, removed at exit
    folders = [args.root / category for category in args.categories]
    folders += [write_generated(name, Path(scratch.name)) for name in args.generate]
    script = str(Path(__file__).with_name("mvtec.py"))
    rows = []
    for name in args.candidates:
        for folder in folders:
            measured = run_isolated(script, ["--settings", json.dumps(CANDIDATES[name]), "--single", str(folder), "patchcore"],
                                    f"{name}/{folder.name}")
            rows.append({"candidate": name, **measured})
            print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    if args.keep_others:
        rows = keep_other_rows(args.out, "frames", rows, ("candidate", "category"), {"candidate": list(CANDIDATES)})
    write_results(args.out, "frames", rows, runs_note(rows) + markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
