#!/usr/bin/env python
"""Build the biasscope bias benchmark (and optionally train the demo CNN on it).

    python datasets/build_bias_benchmark.py                      # default size, seed 0
    python datasets/build_bias_benchmark.py --size small --train
    python datasets/build_bias_benchmark.py --bias 0 --out datasets/generated/unbiased
    python datasets/build_bias_benchmark.py --zoo --train        # every shortcut-zoo case
    python datasets/build_bias_benchmark.py --zoo corner_tag frame --train

All the logic lives in biasscope.benchmark; see datasets/README.md for what is built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    from biasscope import benchmark, zoo
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
    from biasscope import benchmark, zoo

from biasscope.errors import BiasscopeError


def _bias(text: str) -> float | None:
    return None if text.lower() in {"none", "off"} else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: datasets/generated/bias-benchmark-<size>)")
    parser.add_argument("--size", choices=["default", "small"], default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias", type=_bias, default=0.95, help="train co-occurrence rate of the biased classes; 0 or none: uniform")
    parser.add_argument("--flip-rate", type=float, default=0.04, help="fraction of val labels flipped on purpose")
    parser.add_argument("--watermark-class", default=None, help="class whose train images carry a corner patch")
    parser.add_argument("--force", action="store_true", help="rebuild (and retrain) even if cached")
    parser.add_argument("--train", action="store_true", help="also train the demo CNN and report group accuracies")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the size's default)")
    parser.add_argument("--zoo", nargs="*", default=None, metavar="CASE",
                        help=f"build shortcut-zoo cases instead (all when none named): {', '.join(zoo.ZOO)}")
    args = parser.parse_args(argv)
    if args.zoo is not None:
        return _zoo(args)

    out = args.out or HERE / "generated" / f"bias-benchmark-{args.size}"
    try:
        start = time.perf_counter()
        root = benchmark.build_benchmark(
            out,
            size=args.size,
            seed=args.seed,
            bias=args.bias,
            flip_rate=args.flip_rate,
            watermark_class=args.watermark_class,
            force=args.force,
        )
        print(f"benchmark: {root} ({time.perf_counter() - start:.1f} s)")
        if args.train:
            start = time.perf_counter()
            model = benchmark.train_demo_model(
                root,
                epochs=args.epochs,
                seed=args.seed,
                force=args.force,
                progress=lambda epoch, logs: print(f"  epoch {epoch}: " + ", ".join(f"{k}={v:.3f}" for k, v in logs.items())),
            )
            print(f"model: {model} ({time.perf_counter() - start:.1f} s)")
            report = benchmark.evaluate_groups(model, root)
            summary = {k: v for k, v in report.items() if not k.startswith("groups")}
            print(json.dumps(summary, indent=1))
            for g in report["groups"]:
                print(f"  {g['class']:>6} on {g['background']:<7} n={g['n']:<3} acc={g['accuracy']:.2f}{'  (aligned)' if g['bias_aligned'] else ''}")
    except BiasscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _zoo(args) -> int:
    out = args.out or HERE / "generated" / "zoo"
    try:
        for name in args.zoo or list(zoo.ZOO):
            start = time.perf_counter()
            root = zoo.build_case(out / name, name, size=args.size, seed=args.seed, force=args.force)
            print(f"{name}: {root} ({time.perf_counter() - start:.1f} s)")
            if args.train:
                zoo.train_case(root, seed=args.seed, force=args.force)
                m = json.loads((root / "truth.json").read_text())["measured"]
                m.pop("model_key", None)
                print("  " + json.dumps(m))
    except BiasscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
