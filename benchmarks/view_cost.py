"""What the default detector's views cost: fit time and inference time against PatchCore alone, measured in pairs.

    python benchmarks/view_cost.py --root ../shared/datasets --categories mvtec_loco/juice_bottle --pairs 3
    python benchmarks/view_cost.py --categories --generate rotated-parts fine-defects logical-parts --keep-others

On a shared machine the same fit, minutes apart, varies by as much as the views cost, so one run of
each says little. Here each pair runs both models back to back, in fresh processes (`mvtec.py`'s own
measurement), the order alternating from pair to pair, and the table gives each pair's difference and
their median. Inference is the batched time per test image, decoding included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from generated import CATEGORIES, write_generated  # noqa: E402  (benchmarks/generated.py)
from isolated import keep_other_rows, markdown_table, run_isolated, runs_note, write_results  # noqa: E402  (benchmarks/isolated.py, beside this script)

MODELS = ("patchcore", "patchcore global_view=off place_view=off")  # the default detector, PatchCore alone
COLUMNS = (("category", "category", "{}"), ("pair", "pair", "{}"), ("order", "order", "{}"),
           ("fit_default", "fit s, default", "{:.1f}"), ("fit_alone", "fit s, alone", "{:.1f}"),
           ("fit_cost", "fit time added", "{:+.1%}"), ("ms_default", "ms/img batched, default", "{:.1f}"),
           ("ms_alone", "ms/img batched, alone", "{:.1f}"), ("ms_cost", "ms/img added", "{:+.1f}"),
           ("frame_default", "frame, default", "{}"), ("frame_alone", "frame, alone", "{}"),
           ("global_view", "global view", "{}"), ("place_view", "place view", "{}"))


def pair_order(pair: int) -> tuple[str, ...]:
    """The models in the order pair `pair` runs them: the default first in even pairs, PatchCore alone in odd ones."""
    return MODELS if pair % 2 == 0 else MODELS[::-1]


def pair_row(category: str, pair: int, runs: dict[str, dict]) -> dict:
    """One pair's row: both models' fit and batched inference times, and what the default adds."""
    default, alone = runs[MODELS[0]], runs[MODELS[1]]
    return {"category": category, "pair": pair + 1, "order": "default first" if pair_order(pair)[0] == MODELS[0] else "alone first",
            "fit_default": default["fit_s"], "fit_alone": alone["fit_s"], "fit_cost": default["fit_s"] / alone["fit_s"] - 1,
            "ms_default": default["ms_batched"], "ms_alone": alone["ms_batched"],
            "ms_cost": default["ms_batched"] - alone["ms_batched"], "frame_default": default["frame"],
            "frame_alone": alone["frame"], "global_view": default["global_view"],
            "place_view": default["place_view"]}


def median_row(category: str, rows: list[dict]) -> dict:
    """The median of each column over a category's pairs."""
    return {"category": category, "pair": "median", "order": "", **{key: statistics.median(row[key] for row in rows)
            for key in ("fit_default", "fit_alone", "fit_cost", "ms_default", "ms_alone", "ms_cost")},
            **{key: rows[0][key] for key in ("frame_default", "frame_alone", "global_view", "place_view")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--categories", nargs="*", default=["mvtec_loco/juice_bottle"])
    parser.add_argument("--generate", nargs="*", default=[], choices=CATEGORIES,
                        help="also these generated categories (benchmarks/generated.py, seed 0)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--keep-others", action="store_true", help="keep the other categories' rows of the results file")
    args = parser.parse_args()
    script = str(Path(__file__).with_name("mvtec.py"))
    scratch = tempfile.TemporaryDirectory()
    folders = [args.root / category for category in args.categories]
    folders += [write_generated(name, Path(scratch.name), 0) for name in args.generate]
    rows = []
    for folder in folders:
        pairs = []
        for pair in range(args.pairs):
            runs = {model: run_isolated(script, ["--settings", json.dumps({}), "--single", str(folder), model],
                                        f"{folder.name}/{model}") for model in pair_order(pair)}
            pairs.append(pair_row(folder.name, pair, runs))
            print(markdown_table(pairs[-1:], COLUMNS).splitlines()[-1], flush=True)
        rows += [*pairs, median_row(folder.name, pairs)]
    if args.keep_others:
        rows = keep_other_rows(args.out, "view-cost", rows, ("category", "pair"),
                               {"category": [folder.name for folder in folders]})
    write_results(args.out, "view-cost", rows, runs_note(rows) + markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
