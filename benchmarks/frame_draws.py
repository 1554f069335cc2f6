"""How the frame search's choice moves with the draw of its probe: the search run again at other seeds.

    python benchmarks/frame_draws.py --root ../shared/datasets --categories mvtec_ad/bottle mvtec_3d_ad_rgb/tire \
        --generate rotated-parts fine-defects --seeds 0 1 2 3 4 5

The seed draws which good training images are held out and which synthetic defects are pasted into
them (`selection.make_probe`); everything else is the default fit's. Per category and seed: the
chosen candidate, the candidates within the probe's noise of the best (a near tie), every
candidate's synthetic defects caught at the held-out good scores' 1% tail, and the turns' choice at the
chosen frame (`rotations: auto`) with what they caught. Read it beside
benchmarks/results/frames.md, which has each candidate's accuracy on the real test images. No test
image is read. Writes benchmarks/results/frame-draws.json and frame-draws.md.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import torch
from generated import CATEGORIES as GENERATED, write_generated
from isolated import markdown_table, write_results

from defectscope import load_dataset
from defectscope.detectors.frame_search import CANDIDATES, choose_frame
from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig


COLUMNS = (("category", "category", "{}"), ("seed", "seed", "{}"), ("chosen", "chosen", "{}"),
           ("near_tie", "within the noise", "{}"),
           *((name, f"{name}: caught", "{}") for name in CANDIDATES),
           ("turns", "rotations at the chosen frame (caught with the turns)", "{}"))


def draws(folder: Path, seeds: list[int]) -> list[dict]:
    """The search on one category's good training images at each seed."""
    images = [sample.path for sample in load_dataset(folder).train]
    backbone = PatchCore(PatchCoreConfig()).require_backbone()  # loaded once for every draw
    rows = []
    for seed in seeds:
        evidence = choose_frame(images, PatchCoreConfig(seed=seed), backbone).evidence
        count, turns = evidence["synthetic_images"], evidence["rotations"]
        rows.append({"category": folder.name, "seed": seed, "chosen": evidence["chosen"],
                     "near_tie": ", ".join(evidence["within_noise"]) or "none",
                     **{name: f"{round(entry['recall_at_1pct'] * count)}/{count}"
                        for name, entry in evidence["candidates"].items()},
                     "turns": f"{turns['chosen']} ({round(turns['recall_at_1pct_with'] * count)}/{count})",
                     "turns_chosen": turns["chosen"]})
        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--categories", nargs="*", default=["mvtec_ad/bottle", "mvtec_3d_ad_rgb/tire"])
    parser.add_argument("--generate", nargs="*", default=["rotated-parts", "fine-defects", "threaded-parts"],
                        choices=GENERATED)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    scratch = tempfile.TemporaryDirectory()
    folders = [args.root / category for category in args.categories]
    folders += [write_generated(name, Path(scratch.name)) for name in args.generate]
    rows = [row for folder in folders for row in draws(folder, args.seeds)]
    summary = "".join(
        f"\n{folder.name}: " + ", ".join(f"{name} {count} of {len(args.seeds)}" for name, count in Counter(
            row["chosen"] for row in rows if row["category"] == folder.name).most_common())
        + f"; the turns kept {sum(row['turns_chosen'] == 'on' for row in rows if row['category'] == folder.name)} of "
          f"{len(args.seeds)}.\n"
        for folder in folders)
    write_results(args.out, "frame-draws", rows, markdown_table(rows, COLUMNS) + summary)


if __name__ == "__main__":
    main()
