"""Sample quality of a checkpoint, or of a folder of images, against real tiles.

    python evaluate.py --real data --checkpoint RUN_DIR_OR_PREFIX [-n 2048] [--seed S] [--json OUT]
    python evaluate.py --real data --fake DIR [--train data:train] [--holdout data:holdout]

Every number is printed next to the same number for two halves of the real set
(the baseline), so it can be read without knowing typical values. The metrics
themselves are in metrics.py.
"""
import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

import config as config_lib
from cli import ArgumentParser, UserError, run_main
import data
import metrics
import runs

MIN_IMAGES = 4  # per set: two halves of two images at least
MIN_SIDE = 8  # pixels a side: the smallest model.image_size, and more than SWD's patch

HELP_EPILOG = """\
image sets (--real, --fake, --train, --holdout) are written PATH or PATH:SPLIT:
  PATH        a folder of images (searched recursively), a manifest.csv, or a
              folder holding a manifest.csv (read through it)
  PATH:SPLIT  the rows of one manifest split, e.g. data:holdout or
              data/manifest.csv:train; data:all takes every row
  A manifest without :SPLIT gives its "train" rows. A PATH that exists as
  written is never split at a colon.

sizes: -n images per set. Reals are a seeded sample without replacement (all
  of them, with a note, when fewer exist); with --checkpoint as many fakes are
  generated as there are reals, so both sets hold the same number. A --fake
  folder's size is that of its smallest image; larger fakes, and reals larger
  than the fakes, are area-averaged to it (noted), non-square images cut to
  their centred square (noted); for a checkpoint trained with data.load_size,
  reals go to that size, then one seeded window of the fakes' size is taken
  from each, as the run trained.

baseline: each set is split into random halves of n/2. SWD and the colour
  distances of fakes are the mean of (fake half 1 vs real half A) and (fake
  half 2 vs real half B); the baseline is real half A vs real half B. Same set
  sizes on both sides, so a generator as good as the data scores about the
  baseline (SWD grows as sets shrink, so mixing sizes would bias it).

memorisation: nearest-neighbour L2 distances (pixels 0..1) to the training
  tiles, turns and flips included when the run augmented (default without a
  checkpoint). Training set: the run's data.path and data.split, or --train.
  Held-out tiles: --holdout, or the "holdout" split of the training manifest.

reading the numbers:
  SWD x1e3      near the baseline = local texture statistics match; its
                per-channel normalisation hides colour casts, see colour W1
  MS-SSIM       fakes far above the reals = collapse (fakes alike)
  colour W1     grey levels; well above the baseline = a colour cast
  NN L2         fakes' median well below the holdout's, and P(fake nearer to
                train than holdout) near 1 = copies of training tiles (0.5 = none)
  C2ST          held-out accuracy of a small real-vs-fake CNN: 0.5 = cannot
                tell, 1.0 = always can; well below 0.5 when --real is the
                training set and the fakes copy it
  The bundled sample's holdout comes from other places than its training
  tiles (155 of each: SWD 143 against a baseline of 46); compare fakes with
  the training split (--real data), keep the holdout for the memorisation check.

exit status 2 with one "error: ..." line when a set or checkpoint is unusable.
"""


class EvalError(UserError):
    """The arguments cannot be evaluated; the message says what to change."""


# ---------------------------------------------------------------- image sets

def list_set(text, what):
    """(files, description) of one image set."""
    path, split = data.parse_set(text)
    if not os.path.exists(path):
        raise EvalError(f"--{what} '{path}' does not exist; give a folder of images, a manifest.csv "
                        f"or PATH:SPLIT (see --help)")
    if split is not None and not data.is_manifest(path):
        raise EvalError(f"--{what} '{path}' is a plain folder; ':{split}' picks rows of a manifest.csv "
                        f"(drop it to use every image of the folder)")
    split = "train" if split is None else split
    return data.find_images(path, split, data.option_advice(f"--{what}")), data.describe_set(path, split)


def image_sizes(files):
    """{file: (width, height)} from the headers; unreadable files are left to
    data.read_files, which reports every problem of a set at once."""
    sizes = {}
    for file in files:
        with contextlib.suppress(OSError, SyntaxError, ValueError), Image.open(file) as img:
            sizes[file] = img.size
    return sizes


def native_side(sizes, default=MIN_SIDE):
    """A set's own size: the shortest side among its images, in pixels."""
    return min((min(size) for size in sizes.values()), default=default)


def load_set(text, what, image_size, n=None, seed=0, notes=None, load_size=None):
    """(uint8 [N, S, S, 3], description): up to n files, a seeded sample, at image_size.

    image_size None keeps the set's own size (that of its first file). With
    load_size (a run trained with data.load_size) each image is read at that
    size and one seeded image_size window of it is kept, as the run saw them.
    """
    files, description = list_set(text, what)
    size_of = image_sizes(files)
    side = native_side(size_of, image_size or MIN_SIDE)
    image_size = image_size or side
    read_size = max(load_size or 0, image_size)
    if side < read_size:
        raise EvalError(f"--{what}: the images of {description} are {side}x{side}, smaller than the "
                        f"{read_size}x{read_size} the "
                        f"{'run trained on' if read_size > image_size else 'fakes are'}; "
                        f"give larger images")
    if n is not None and len(files) > n:
        pick = np.random.default_rng([seed, len(files)]).permutation(len(files))[:n]
        files = [files[i] for i in sorted(pick)]
    elif n is not None and len(files) < n and notes is not None:
        notes.append(f"{what}: only {len(files)} images in {description}, fewer than -n {n}; "
                     f"all of them are used")
    sizes = [size_of[f] for f in files if f in size_of]
    larger = sum(min(size) > read_size for size in sizes)
    oblong = sum(size[0] != size[1] for size in sizes)
    match = "run" if read_size > image_size else "fakes" if what == "real" else "smallest fakes"
    if larger and notes is not None:
        notes.append(f"{what}: {larger} of {len(sizes)} images area-averaged to "
                     f"{read_size}x{read_size} to match the {match}")
    if oblong and notes is not None:
        notes.append(f"{what}: {oblong} of {len(sizes)} images not square; their centred "
                     f"square is used")
    advice = data.option_advice(f"--{what}")
    tiles, problems = data.read_files(files, read_size, advice=advice)
    if problems:
        raise data.unusable(f"{len(problems)} of {len(files)} {what} images", files, problems,
                            advice)
    if read_size > image_size and notes is not None:
        notes.append(f"{what}: one seeded {image_size}x{image_size} window of each "
                     f"{read_size}x{read_size} image, as the run trained (data.load_size)")
    return data.random_crops(tiles, image_size, np.random.default_rng([seed, read_size])), description


def train_and_holdout(args, run_cfg, image_size, notes, load_size=None):
    """(train tiles or None, holdout tiles or None, descriptions) for the memorisation check."""
    if args.train:
        train_text = args.train
    elif run_cfg is not None:
        split = run_cfg.data.split
        train_text = f"{run_cfg.data.path}:{split or 'all'}" if data.is_manifest(run_cfg.data.path) \
            else run_cfg.data.path
        if not os.path.exists(run_cfg.data.path):
            notes.append(f"nearest-neighbour check skipped: the run's training set "
                         f"'{run_cfg.data.path}' is not found from here; give --train")
            return None, None, {}
    else:
        notes.append("nearest-neighbour check skipped: no training set known; "
                     "give --train (and --holdout)")
        return None, None, {}
    train, train_desc = load_set(train_text, "train", image_size, notes=notes, load_size=load_size)
    found = {"train": train_desc}

    holdout_text = args.holdout
    if holdout_text is None:
        path, split = data.parse_set(train_text)
        split = "train" if split is None else split
        if not data.is_manifest(path):
            notes.append("nn_holdout_to_train omitted: the training set is a plain folder; "
                         "give --holdout")
        elif split in ("", data.HOLDOUT):
            notes.append(f"nn_holdout_to_train omitted: the training set takes the manifest's "
                         f"{'every row' if not split else 'holdout rows'}; give --holdout")
        elif data.HOLDOUT not in data.manifest_splits(path):
            notes.append(f"nn_holdout_to_train omitted: {path} has no '{data.HOLDOUT}' split; "
                         f"give --holdout")
        else:
            holdout_text = f"{path}:{data.HOLDOUT}"
    holdout = None
    if holdout_text is not None:
        holdout, found["holdout"] = load_set(holdout_text, "holdout", image_size, notes=notes,
                                             load_size=load_size)
    return train, holdout, found


# ---------------------------------------------------------------- fakes

def generate_fakes(checkpoint, n, seed, threads=0, weights=None):
    """(uint8 fakes [n, S, S, 3], step, run config, prefix, weights described) from a
    checkpoint in inference mode; `weights` as sampling.weights_scope takes it."""
    import sampling  # TensorFlow loads only when a checkpoint is evaluated
    gen = sampling.Generator(checkpoint, threads=threads, weights=weights)
    every = max(gen.batch_size, n // 4 // gen.batch_size * gen.batch_size)

    def progress(done, total):
        if done % every == 0 or done == total:
            print(f"  {done}/{total} fakes", flush=True)

    try:
        return gen.generate(gen.latents(n, seed), progress), gen.step, gen.cfg, gen.prefix, \
            gen.weights
    finally:
        gen.close()


# ---------------------------------------------------------------- report

def fmt(values, digits=2):
    if isinstance(values, (list, tuple)):
        return " ".join(f"{v:.{digits}f}" for v in values)
    return f"{values:.{digits}f}"


def table(results):
    """The printed report: one row per number, fakes next to their real reference."""
    rows = [("", "fakes", "reals")]
    swd, base = results["swd_x1e3"], results["swd_real_baseline_x1e3"]
    for key in swd:
        rows.append((f"SWD x1e3 {key:>3}  (lower = closer)", fmt(swd[key]), fmt(base[key]) + "  baseline"))
    rows.append(("MS-SSIM  (higher = less diverse)", fmt(results["ms_ssim_fake"], 3),
                 fmt(results["ms_ssim_real"], 3)))
    colour = results["color_stats"]
    rows.append(("colour mean R G B", fmt(colour["fake_mean"], 1), fmt(colour["real_mean"], 1)))
    rows.append(("colour std  R G B", fmt(colour["fake_std"], 1), fmt(colour["real_std"], 1)))
    rows.append(("colour W1   R G B  (grey levels)", fmt(colour["w1"]),
                 fmt(colour["w1_real_baseline"]) + "  baseline"))
    if "nn_fake_to_train" in results:
        holdout = fmt(results["nn_holdout_to_train"]) + "  holdout" \
            if "nn_holdout_to_train" in results else "-"
        rows.append(("NN L2 to train, median", fmt(results["nn_fake_to_train"]), holdout))
    if "nn_fake_closer_than_holdout" in results:
        rows.append(("P(fake nearer to train than holdout)", fmt(results["nn_fake_closer_than_holdout"], 3),
                     "0.500  no copying"))
    rows.append(("C2ST accuracy  (0.5 = indistinguishable)", fmt(results["c2st_acc"], 3), ""))
    width = max(len(r[0]) for r in rows)
    colw = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>{colw}}  {c}".rstrip() for a, b, c in rows)


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = ArgumentParser(
        prog="evaluate.py",
        description="Measure how close generated tiles are to real ones (SWD, MS-SSIM, "
                    "colour, nearest neighbours, a classifier two-sample test).",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, metavar="PATH[:SPLIT]",
                   help="real tiles to compare with (e.g. data, the sample's training split)")
    fakes = p.add_mutually_exclusive_group(required=True)
    fakes.add_argument("--fake", metavar="PATH[:SPLIT]", help="a set of generated images")
    fakes.add_argument("--checkpoint", metavar="PREFIX_OR_RUN_DIR",
                       help="generate the fakes with this checkpoint (a run folder's newest, or "
                            "a prefix like RUN/checkpoints/model-500)")
    p.add_argument("--weights", choices=config_lib.GENERATOR_WEIGHTS,
                   help="with --checkpoint: the generator's averaged weights (the default when "
                        "the run kept them, train.g_average) or its trained ones")
    p.add_argument("-n", type=int, default=2048, help="images per set (default 2048)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the real sample, the latents and every metric (default 0)")
    p.add_argument("--train", metavar="PATH[:SPLIT]",
                   help="training tiles for the memorisation check (default with --checkpoint: "
                        "the run's data.path and data.split)")
    p.add_argument("--holdout", metavar="PATH[:SPLIT]",
                   help="held-out real tiles for the memorisation check (default: the training "
                        "manifest's holdout split)")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--threads", type=int, metavar="T", default=0,
                   help="intra-op threads of TensorFlow's work (default: all cores below 4, "
                        "else cores - 1)")
    args = p.parse_args(argv)
    if args.n < MIN_IMAGES:
        p.error(f"-n must be at least {MIN_IMAGES}")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if args.weights and not args.checkpoint:
        p.error("--weights goes with --checkpoint")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    args.threads = args.threads or config_lib.default_threads()  # Lesson 28
    config_lib.expand_home(args, ("real", "fake", "checkpoint", "train", "holdout", "json"))
    return args


def main(argv=None):
    args = parse_args(argv)
    problem = args.json and config_lib.json_output_problem(args.json)
    if problem:
        raise EvalError(problem)
    started = time.time()
    notes, timings, checkpoint_info = [], {}, {}

    run_cfg, load_size = None, None
    if args.checkpoint:
        prefix, run_dir = runs.resolve_checkpoint(args.checkpoint)  # fails before any reading
        run_cfg = runs.read_run_config(run_dir)
        image_size = run_cfg.model.image_size
        load_size = run_cfg.data.load_size or None
    else:
        fake_files, _ = list_set(args.fake, "fake")
        image_size = native_side(image_sizes(fake_files))
        if image_size < MIN_SIDE:
            raise EvalError(f"--fake '{args.fake}' holds images of {image_size} pixels a side; the "
                            f"metrics need at least {MIN_SIDE}x{MIN_SIDE} (SWD compares "
                            f"{metrics.SWD_PATCH}x{metrics.SWD_PATCH} patches)")

    t = time.time()
    real, real_desc = load_set(args.real, "real", image_size, args.n, args.seed, notes, load_size)
    if not args.checkpoint:
        fake, fake_desc = load_set(args.fake, "fake", None, args.n, args.seed, notes)
    timings["load_sets"] = time.time() - t

    if args.checkpoint:
        t = time.time()
        print(f"generating {len(real)} fakes with {prefix} ...", flush=True)
        fake, step, run_cfg, prefix, weights = generate_fakes(args.checkpoint, len(real),
                                                              args.seed, args.threads, args.weights)
        timings["generate"] = time.time() - t
        fake_desc = f"checkpoint {prefix} (step {step}, the generator's {weights})"
        checkpoint_info = {"checkpoint": prefix, "checkpoint_step": step}
    m = min(len(real), len(fake))
    if m < MIN_IMAGES:
        raise EvalError(f"need at least {MIN_IMAGES} images per set; got {len(real)} real and "
                        f"{len(fake)} fake")
    if len(real) != len(fake):
        notes.append(f"sets cut to {m} images each (a seeded sample of the larger one)")

    t = time.time()
    train, holdout, found = train_and_holdout(args, run_cfg, image_size, notes, load_size)
    timings["load_train"] = time.time() - t
    dihedral = run_cfg.data.augment if run_cfg is not None else True

    print(f"evaluating {m} fakes from {fake_desc} against {m} reals from {real_desc}, "
          f"{image_size}x{image_size}, seed {args.seed} ...", flush=True)
    results = metrics.evaluate_sets(real, fake, train, holdout, seed=args.seed, dihedral=dihedral,
                                    threads=args.threads)
    timings.update(results.pop("timings"))
    timings["total"] = time.time() - started
    report = {"real": real_desc, "fake": fake_desc, **found, "image_size": image_size,
              "n_requested": args.n, **checkpoint_info, **results, "nn_dihedral": dihedral,
              "notes": notes, "timings": {k: round(v, 2) for k, v in timings.items()}}

    print(table(report))
    for note in notes:
        print(f"note: {note}")
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def cli(argv=None):
    return run_main(main, argv, errors=(OSError,))


if __name__ == "__main__":
    sys.exit(cli())
