"""Few-shot classification of your own images: from a folder of PNGs to predictions on a new task.

    python examples/own_data.py --data-dir path/to/images    # <images>/<class>/<image>, see docs/own_data.md

Without --data-dir the script draws a folder of synthetic glyphs into a temporary directory and
uses it: 100 classes of 20 PNGs, each class a few random pen strokes, each image a jittered,
rotated, rescaled copy drawn with its own pen width. The classes are split class-disjointly
(meta_train_test_split, --test-size of them held out), the solver is meta-trained on N-way K-shot
tasks of the training classes (5 query images per class, so every class needs --k-shot + 5
images), scored on tasks of the held-out classes, then adapted to one held-out task given as image
files, and its predictions for one new query file of each class are printed as class names. The
default run takes about 2.5 minutes on a 2-core CPU. Batch norm uses the statistics of each batch
and evaluation is transductive. A --data-dir folder's decoded images are cached in the cache home
(FEWSHOT_CACHE, see docs/datasets.md), so the next run skips decoding.
"""

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

import fewshot
from fewshot.datasets import image_folder_tasks
from fewshot.model_selection import meta_train_test_split

N_QUERY = 5  # query images per class in meta-training and scoring: each class needs k_shot + 5 images
GLYPH_CLASSES, GLYPH_IMAGES, GLYPH_SIDE = 100, 20, 56


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default, and the description as it is written."""


def write_glyphs(root: Path, seed: int) -> None:
    """``root/glyphNN/MM.png``: white pen strokes on black, ``GLYPH_SIDE`` pixels square."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for c in range(GLYPH_CLASSES):
        strokes = [rng.uniform(0.15, 0.85, (rng.integers(2, 5), 2)) for _ in range(rng.integers(2, 4))]
        (root / f"glyph{c:02d}").mkdir(parents=True)
        for i in range(GLYPH_IMAGES):
            turn, scale = rng.normal(0, 0.3), rng.uniform(0.85, 1.1)
            affine = scale * np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
            shift, width = rng.normal(0, 0.04, 2), int(rng.integers(2, 5))
            image = Image.new("L", (GLYPH_SIDE, GLYPH_SIDE), 0)
            draw = ImageDraw.Draw(image)
            for points in strokes:
                points = (points - 0.5 + rng.normal(0, 0.06, points.shape)) @ affine.T + 0.5 + shift
                draw.line([tuple(p) for p in points * GLYPH_SIDE], fill=255, width=width, joint="curve")
            image.save(root / f"glyph{c:02d}" / f"{i:02d}.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", help="folder with one subfolder of images per class; without it, "
                        "synthetic glyphs in a temporary directory")
    parser.add_argument("--solver", default="FOMAML", choices=sorted(fewshot.SOLVERS), help="estimator")
    parser.add_argument("--meta-steps", type=int, default=100, help="meta-training steps")
    parser.add_argument("--n-way", type=int, default=5, help="classes per task")
    parser.add_argument("--k-shot", type=int, default=1, help="support images per class")
    parser.add_argument("--image-size", type=int, default=28,
                        help="images are resized to N x N (conv4 needs N >= 16)")
    parser.add_argument("--mode", default="L", choices=["L", "RGB"], help="grayscale (L) or colour (RGB)")
    parser.add_argument("--test-size", type=float, default=0.25,
                        help="fraction of the classes (class groups, for nested folders) held out")
    parser.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks to score")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, estimator, new task")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--save", help="file to write the meta-parameters to (for fewshot.load_meta_params)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, cache_dir = (Path(args.data_dir), None) if args.data_dir else (Path(tmp) / "glyphs", tmp)
        if not args.data_dir:
            write_glyphs(data_dir, args.seed)
            print(f"no --data-dir: wrote {GLYPH_CLASSES} classes of {GLYPH_IMAGES} synthetic glyph PNGs "
                  f"({GLYPH_SIDE}x{GLYPH_SIDE}) to {data_dir}")
        sampler = image_folder_tasks(data_dir, n_way=args.n_way, k_shot=args.k_shot, n_query=N_QUERY,
                                     image_size=args.image_size, mode=args.mode, cache_dir=cache_dir)
        size = f"{args.image_size}x{args.image_size}"
        print(f"{sampler.n_classes} classes, {sum(sampler.class_counts)} images; preprocessing: "
              f"convert({sampler.mode!r}), resize to {size} ({sampler.resample}), "
              f"value / 255 -> float32 {list(sampler.input_shape)}")
        train, test = meta_train_test_split(sampler, test_size=args.test_size, random_state=args.seed)
        print(f"meta-training on {train.n_classes} classes, {test.n_classes} held out")

        params = dict(meta_steps=args.meta_steps, random_state=args.seed)
        if args.solver != "FineTune":
            params.update(inner_lr=0.4, inner_steps=5, adapt_steps=10, meta_batch_size=16, meta_lr=3e-3)
        learner = fewshot.SOLVERS[args.solver](**params).meta_fit(train)
        result = learner.evaluate(test, n_tasks=args.eval_tasks, random_state=0)
        print(f"{args.solver}: held-out accuracy {100 * result.mean:.2f}% +- {100 * result.ci95:.2f} "
              f"(95% CI, {args.eval_tasks} tasks of {args.n_way}-way {args.k_shot}-shot, "
              f"chance {100 / args.n_way:.0f}%, transductive batch norm={learner.transductive})")
        if args.save:
            print(f"meta-parameters written to {learner.save_meta_params(args.save)} "
                  "(fewshot.load_meta_params reads them back)")

        # A new task as files: n_way held-out classes, k_shot support files and one query file each.
        rng = np.random.default_rng(args.seed)
        names = [test.class_names[c] for c in rng.choice(test.n_classes, args.n_way, replace=False)]
        files = [sampler.files[name] for name in names]
        support = [f for class_files in files for f in class_files[:args.k_shot]]
        queries = [class_files[rng.integers(args.k_shot, len(class_files))] for class_files in files]
        labels = np.repeat(np.arange(args.n_way), args.k_shot)  # support file i has label labels[i]
        model = learner.adapt((sampler.preprocess(support), labels))
        predicted = model.predict(sampler.preprocess(queries)).tolist()
        print(f"a new task: {len(support)} support files of {', '.join(names)}; "
              "query file -> predicted class:")
        for path, label in zip(queries, predicted):
            print(f"  {path.relative_to(sampler.root)} -> {names[label]}")
        print(f"{sum(p == i for i, p in enumerate(predicted))} of {len(queries)} right")


if __name__ == "__main__":
    main()
