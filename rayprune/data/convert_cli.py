"""``rayprune-convert``: turn CIFAR-10, .npz files and image folders into a rayprune pool."""

from __future__ import annotations

import argparse
import logging
import sys

from rayprune.data.converters import EXPECTED_INPUT
from rayprune.data.pool import MIN_CLASSES, WHY_TWO_CLASSES, PoolError
from rayprune.errors import EXIT_INPUT, one_line

DESCRIPTION = """\
Convert image datasets into a rayprune pool: a directory of Parquet files (columns
id int64, image binary = H*W*C uint8 bytes in HWC order, label int64, source string)
plus pool.json (row count, image shape, number of classes, rows per source, file list).
Ids are 0..N-1 in input order: CIFAR-10 first, then the .npz files in the order given,
then the image folder. All inputs must share one image size; the pool's number of
classes is the largest over the inputs. The .npz headers and labels and the folder's
image sizes are checked before any row is written; a failed conversion leaves OUT_DIR
as it was. A pool needs at least 2 classes.

Nothing is downloaded: fetch CIFAR-10 yourself (https://www.cs.toronto.edu/~kriz/cifar.html,
or torchvision.datasets.CIFAR10(root, download=True)) and point --cifar10 at the extracted
cifar-10-batches-py or cifar-10-batches-bin directory (or its parent)."""

EPILOG = """\
inputs:
  --cifar10 DIR   CIFAR-10 python (pickled batches, loaded with a numpy-only unpickler)
                  or binary version; 32x32x3, 10 classes; source "real"
  --npz FILE      arrays 'image' (N, H, W, C) uint8 and 'label' (N,) integers, streamed
                  from the zip in chunks (files of tens of GB are fine); source "synthetic"
  --folder DIR    one subfolder per class (class index = position in the sorted subfolder
                  names), images of one size, read as RGB; source "real"

examples:
  rayprune-convert pools/cifar10-train --cifar10 data/cifar-10-batches-py
  rayprune-convert pools/cifar10-test --cifar10 data/cifar-10-batches-py --cifar10-split test
  rayprune-convert pools/cifar10-1m --cifar10 data/cifar-10-batches-py --npz data/1m.npz
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayprune-convert", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="the pool directory to create (must not exist unless --overwrite)")
    group = parser.add_argument_group("inputs (at least one)")
    group.add_argument("--cifar10", metavar="DIR",
                       help="CIFAR-10 directory (cifar-10-batches-py or -bin, or their parent)")
    group.add_argument("--cifar10-split", choices=["train", "test"], default="train",
                       help="CIFAR-10 split: train = data_batch_1..5, test = test_batch (default: train)")
    group.add_argument("--npz", metavar="FILE", nargs="+", action="extend", default=[],
                       help="one or more .npz files (repeatable), converted in the order given; put OUT_DIR "
                            "before --npz (or end the list with --)")
    group.add_argument("--folder", metavar="DIR", help="image folder with one subfolder per class")
    sources = parser.add_argument_group(
        "source names (the pool's 'source' column; only 'synthetic' is pruned by default)")
    sources.add_argument("--cifar10-source", metavar="NAME", default="real", help="(default: real)")
    sources.add_argument("--npz-source", metavar="NAME", default="synthetic", help="(default: synthetic)")
    sources.add_argument("--folder-source", metavar="NAME", default="real", help="(default: real)")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="declare the number of classes (at least 2): every label must be below N (default: 10 "
                             "for CIFAR-10, max label + 1 for .npz, the number of subfolders for a folder; the pool "
                             "takes the largest)")
    parser.add_argument("--rows-per-file", type=int, default=50_000, metavar="N",
                        help="rows per Parquet file (default: 50000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it holds a pool and nothing else: only its pool.json and the files "
                             "that lists are removed, and only after the new pool is complete (a failed conversion "
                             "leaves the old pool as it was); any other file or folder in OUT_DIR, hidden ones "
                             "included, stops the conversion before any input is read")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def format_summary(out_dir, info) -> str:
    sources = ", ".join(f"{name}={count}" for name, count in sorted(info.sources.items()))
    return (
        f"wrote pool {out_dir}: {info.num_rows} rows in {len(info.files)} file(s); sources {sources}; "
        f"image shape {'x'.join(map(str, info.image_shape))} (HxWxC); {info.num_classes} classes"
    )


EXPECTED = {"OUT_DIR": "the pool directory to create", "--cifar10": EXPECTED_INPUT["cifar10"],
            "--npz": EXPECTED_INPUT["npz"], "--folder": EXPECTED_INPUT["folder"]}


def option_problem(args: argparse.Namespace) -> str | None:
    """The first option whose value cannot work, as one line naming it; None if all can.

    Checked before any input is read: an empty path would otherwise mean the current
    directory (or be silently skipped), and a bad count would surface only at the end.
    """
    given = {"OUT_DIR": [args.out_dir], "--cifar10": [args.cifar10], "--npz": args.npz, "--folder": [args.folder]}
    for option, values in given.items():
        if any(value == "" for value in values):
            return f"{option} is an empty path; give {EXPECTED[option]}"
    if args.num_classes is not None and args.num_classes < MIN_CLASSES:
        return f"--num-classes must be >= {MIN_CLASSES} ({WHY_TWO_CLASSES}); got {args.num_classes}"
    if args.rows_per_file < 1:
        return f"--rows-per-file must be >= 1; got {args.rows_per_file}"
    return None


def _error(message: str) -> int:
    """Print the one line of a bad input and return its exit status (2, as argparse does)."""
    print(f"rayprune-convert: error: {one_line(message)}", file=sys.stderr)
    return EXIT_INPUT


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = option_problem(args)
    if problem:
        return _error(problem)
    if args.cifar10 is None and not args.npz and args.folder is None:
        parser.error("give at least one input: --cifar10 DIR, --npz FILE or --folder DIR")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayprune.data.converters import InputSpec, convert

    try:
        inputs = []
        if args.cifar10 is not None:
            inputs.append(InputSpec("cifar10", args.cifar10, source=args.cifar10_source, split=args.cifar10_split,
                                    num_classes=args.num_classes))
        inputs += [InputSpec("npz", f, source=args.npz_source, num_classes=args.num_classes) for f in args.npz]
        if args.folder is not None:
            inputs.append(InputSpec("folder", args.folder, source=args.folder_source, num_classes=args.num_classes))
        info = convert(inputs, args.out_dir, rows_per_file=args.rows_per_file, overwrite=args.overwrite)
    except PoolError as exc:  # bad input: one line, status 2 (as for bad flags and the job's input errors)
        return _error(str(exc))
    except OSError as exc:  # e.g. disk full while writing: not the input's fault
        print(f"rayprune-convert: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(format_summary(args.out_dir, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
