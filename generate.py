"""Images from a trained checkpoint: samples, the Turing quiz, interpolations, a SavedModel.

    python generate.py --checkpoint PREFIX_OR_RUN_DIR -n 100 --out DIR [--batch-size B] [--seed S]
    python generate.py --checkpoint ... --turing --real DIR --out DIR [--rows 6 --cols 6] [--pattern N|random]
    python generate.py --checkpoint ... --interpolate [--points 4 --frames 16] --out DIR
    python generate.py --checkpoint ... --export DIR

The architecture comes from the run folder's config.json, and the generator
runs in inference mode (moving-average batch norm, Lesson 23), so an image
depends on its latent vector only, never on the batch it was computed in.
Outputs with the names written here are overwritten; nothing else in --out is
touched.
"""
import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

import device  # first of the TensorFlow importers: it holds back TensorFlow's benign notices
import tensorflow as tf

import config as config_lib
from cli import ArgumentParser, run_main
import data
import runs
import sampling

tf1 = tf.compat.v1
tf.get_logger().setLevel("ERROR")

SAMPLE_NAME = "fake-{:06d}.png"
SAMPLE_RE = re.compile(r"fake-(\d{6,})\.png")
DISPLAY_PX = 64        # pictures meant for people (quiz, grids) show a tile at least this wide
GIF_PX = 128           # and the animation at least this wide
GAP_PX = 2             # white gap between the cells of a grid
FRAME_MS = 80          # time per GIF frame
ANSWER_RGB = (255, 0, 0)  # the frame around a fake in answer.png
# Independent random streams of one --seed (the latents use the seed alone).
PATTERN_STREAM, REALS_STREAM = 1, 2
MAX_BATCH = 1024        # images per session run at most: a larger batch only costs memory
MAX_CELLS = 4096        # cells of a quiz or interpolation picture (64 px each: ~50 MB)
PROGRESS_QUIET_S = 2.0  # runs shorter than this print no progress
PROGRESS_EVERY_S = 10.0  # otherwise a line every 10% done or this often


class Progress:
    """progress(done, total): a line on stderr each 10% or PROGRESS_EVERY_S; short runs are quiet."""

    def __init__(self, what):
        self.what = what
        self.started = self.last = time.time()
        self.tenth = 0

    def __call__(self, done, total):
        now = time.time()
        tenth = 10 * done // total
        due = tenth > self.tenth or now - self.last >= PROGRESS_EVERY_S
        self.tenth = tenth
        if not due or now - self.started < PROGRESS_QUIET_S:
            return
        self.last = now
        rate = done / (now - self.started)
        print(f"{self.what}: {done}/{total} ({100 * done // total}%), {rate:.0f}/s, "
              f"{(total - done) / rate:.0f} s left", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pictures

def upscale(images_u8, min_px):
    """Nearest-neighbour x k (k whole) so a tile is at least min_px wide; pixels stay exact."""
    k = max(1, -(-min_px // images_u8.shape[-2]))
    return images_u8.repeat(k, axis=-3).repeat(k, axis=-2)


def tile_grid(images_u8, cols, gap=GAP_PX):
    """[N, H, W, 3] -> one picture, `cols` tiles per row in row-major order, white gaps."""
    return data.image_grid(images_u8, gap, cols)


def cell_origin(row, col, cell_px, gap=GAP_PX):
    """Top-left pixel (y, x) of a grid cell."""
    return row * (cell_px + gap), col * (cell_px + gap)


def save_png(path, picture_u8):
    Image.fromarray(picture_u8).save(path)


# ---------------------------------------------------------------- the Turing quiz

def n_pattern(rows, cols):
    """bool [rows, cols]: the letter N, the write-up's fakes (left and right
    columns and the diagonal from top-left to bottom-right)."""
    mask = np.zeros((rows, cols), bool)
    mask[:, 0] = mask[:, -1] = True
    for r in range(rows):
        mask[r, round(r * (cols - 1) / (rows - 1))] = True
    return mask


def random_pattern(rows, cols, count, rng):
    """bool [rows, cols] with `count` cells chosen at random."""
    mask = np.zeros(rows * cols, bool)
    mask[rng.choice(rows * cols, count, replace=False)] = True
    return mask.reshape(rows, cols)


def quiz_cells(mask, fakes_u8, reals_u8):
    """Tiles [rows * cols, S, S, 3], row-major: the fakes where mask, else the reals, in order."""
    cells = np.empty((mask.size, *fakes_u8.shape[1:]), np.uint8)
    cells[mask.ravel()] = fakes_u8
    cells[~mask.ravel()] = reals_u8
    return cells


def mark_answer(quiz_u8, mask, cell_px, gap=GAP_PX, color=ANSWER_RGB):
    """A copy of the quiz picture with a frame drawn inside every fake cell."""
    answer = quiz_u8.copy()
    width = max(2, cell_px // 16)
    for r, c in zip(*np.nonzero(mask)):
        top, left = cell_origin(r, c, cell_px, gap)
        cell = answer[top:top + cell_px, left:left + cell_px]
        cell[:width] = cell[-width:] = color
        cell[:, :width] = cell[:, -width:] = color
    return answer


def answer_json(answer):
    """JSON text with one key per line and one real tile per line."""
    lines = []
    for key, value in answer.items():
        if key == "reals":
            value = "[\n  " + ",\n  ".join(json.dumps(v) for v in value) + "\n ]"
        else:
            value = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {value}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def make_quiz(gen, args):
    """quiz.png, answer.png and answer.json in args.out; returns the summary line."""
    m = gen.cfg.model
    rows, cols = args.rows, args.cols
    if args.pattern == "N":
        mask = n_pattern(rows, cols)
    else:  # as many fakes as the N, so both patterns are equally hard
        mask = random_pattern(rows, cols, int(n_pattern(rows, cols).sum()),
                              np.random.default_rng([args.seed, PATTERN_STREAM]))
    n_fakes = int(mask.sum())
    n_reals = mask.size - n_fakes

    real, named = data.parse_set(args.real)  # PATH or PATH:SPLIT, as evaluate.py reads it
    if named is not None and args.split is not None and named != args.split:
        raise runs.RunError(f"--real '{args.real}' names split '{named}' and --split "
                            f"'{args.split}' another; give one")
    split = named if named is not None else args.split
    split = data.comparison_split(real) if split is None else split
    tiles, files = data.load_tiles(real, split, config_lib.load_size(gen.cfg),
                                   gen.cfg.data.grayscale, advice=data.option_advice("--real"),
                                   log=lambda text: print(text, file=sys.stderr))
    if len(files) < n_reals:
        raise runs.RunError(f"'{real}' holds {len(files)} real tiles"
                            + (f" of split '{split}'" if split else "")
                            + f", but a {rows}x{cols} quiz with {n_fakes} fakes needs {n_reals}; "
                            f"give a folder with more tiles or use a smaller --rows/--cols")
    chosen = np.random.default_rng([args.seed, REALS_STREAM]).choice(len(files), n_reals,
                                                                     replace=False)
    fakes = gen.generate(gen.latents(n_fakes, args.seed))
    reals = data.random_crops(tiles[chosen], m.image_size,  # as trained (data.load_size)
                              np.random.default_rng([args.seed, REALS_STREAM, 1]))
    cells = upscale(quiz_cells(mask, fakes, reals), DISPLAY_PX)
    cell_px = cells.shape[1]
    quiz = tile_grid(cells, cols)

    real_cells = zip(*np.nonzero(~mask))  # row-major, the order of `chosen`
    answer = {
        "rows": rows, "cols": cols, "pattern": args.pattern,
        "fakes": [[int(r), int(c)] for r, c in zip(*np.nonzero(mask))],
        "reals": [{"row": int(r), "col": int(c), "file": os.path.abspath(files[i])}
                  for (r, c), i in zip(real_cells, chosen)],
        "checkpoint": os.path.abspath(gen.prefix), "step": gen.step, "seed": args.seed,
        "real_source": os.path.abspath(real), "split": split,
        "cell_px": cell_px, "gap_px": GAP_PX,
    }
    outputs = {"quiz.png": quiz, "answer.png": mark_answer(quiz, mask, cell_px)}
    replaced = existing(args.out, [*outputs, "answer.json"])
    os.makedirs(args.out, exist_ok=True)  # only now: a refused quiz leaves no folder
    for name, picture in outputs.items():
        save_png(os.path.join(args.out, name), picture)
    with open(os.path.join(args.out, "answer.json"), "w") as f:
        f.write(answer_json(answer))
    source = f"{real}" + (f" (split {split})" if split else "")
    return (f"wrote quiz.png ({rows}x{cols} tiles: {n_fakes} fakes in the {args.pattern} "
            f"pattern, {n_reals} real tiles from {source}), answer.png and answer.json "
            f"to {args.out}{replaced}")


# ---------------------------------------------------------------- interpolation

def slerp(a, b, t):
    """Spherical interpolation [len(t), z_dim] from a (t=0) to b (t=1) along the great circle.

    Linear interpolation cuts through the middle of the latent space, where
    vectors are much shorter than any the generator saw; slerp keeps their
    length typical. Nearly parallel vectors fall back to linear interpolation.
    """
    t = np.asarray(t, np.float64)[:, None]
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return ((1.0 - t) * a + t * b).astype(np.float32)
    path = (np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    return path.astype(np.float32)


def loop_latents(points_z, frames):
    """[P, frames, z_dim]: row i goes from point i to point i+1, the last back to the first."""
    t = np.linspace(0.0, 1.0, frames)
    return np.stack([slerp(a, b, t) for a, b in zip(points_z, np.roll(points_z, -1, axis=0))])


def make_interpolation(gen, args):
    """interpolation.png and interpolation.gif in args.out; returns the summary line."""
    z = loop_latents(gen.latents(args.points, args.seed), args.frames)  # [P, F, z_dim]
    images = gen.generate(z.reshape(-1, gen.z_dim))  # [P * F, S, S, 3], row by row
    grid = tile_grid(upscale(images, DISPLAY_PX), args.frames)
    # Each row ends on the next row's first image: the GIF shows it once.
    by_row = images.reshape(args.points, args.frames, *images.shape[1:])
    frames = upscale(by_row[:, :-1].reshape(-1, *images.shape[1:]), GIF_PX)
    replaced = existing(args.out, ["interpolation.png", "interpolation.gif"])
    os.makedirs(args.out, exist_ok=True)
    save_png(os.path.join(args.out, "interpolation.png"), grid)
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(os.path.join(args.out, "interpolation.gif"), save_all=True, append_images=rest,
               duration=FRAME_MS, loop=0)
    return (f"wrote interpolation.png ({args.points} rows of {args.frames} frames, a closed "
            f"loop through {args.points} latent points) and interpolation.gif ({len(frames)} "
            f"frames of {frames.shape[1]}x{frames.shape[2]} px) to {args.out}{replaced}")


# ---------------------------------------------------------------- samples

def make_samples(gen, args):
    """fake-NNNNNN.png in args.out, one batch in memory at a time; returns the summary line."""
    os.makedirs(args.out, exist_ok=True)
    earlier = [int(match[1]) for match in map(SAMPLE_RE.fullmatch, os.listdir(args.out)) if match]
    replaced = sum(i < args.n for i in earlier)
    others = len(earlier) - replaced
    rng = np.random.default_rng(args.seed)  # one stream, so the batch size cannot matter
    progress = Progress("generated")
    started = time.time()
    for start in range(0, args.n, gen.batch_size):
        z = sampling.sample_latents(rng, (min(gen.batch_size, args.n - start), gen.z_dim),
                                 gen.z_dist)
        for i, image in enumerate(gen.generate(z), start):
            save_png(os.path.join(args.out, SAMPLE_NAME.format(i)), image)
        progress(start + len(z), args.n)
    size = gen.cfg.model.image_size
    return (f"wrote {args.n} images {SAMPLE_NAME.format(0)}..{SAMPLE_NAME.format(args.n - 1)} "
            f"({size}x{size}, seed {args.seed}) to {args.out}"
            + (f", replacing {replaced} existing files" if replaced else "")
            + f" in {time.time() - started:.1f} s"
            + (f"\nnote: {args.out} also holds {others} other fake-*.png files (from an earlier "
               f"run?), left as they were" if others else ""))


def existing(folder, names):
    """', replacing K existing files' for the names already in `folder`, else ''."""
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    count = sum(name in present for name in names)
    return f", replacing {count} existing files" if count else ""


# ---------------------------------------------------------------- SavedModel

def export_saved_model(prefix, run_dir, cfg, export_dir, step, weights=None):
    """A SavedModel of the generator in inference mode: z float32 [None, z_dim] -> uint8 images.

    `weights`: as sampling.weights_scope takes it (None: the run's averaged copy if it kept one).
    """
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise runs.RunError(f"--export '{export_dir}' is a file; give a new folder")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        raise runs.RunError(f"--export '{export_dir}' already exists and is not empty; "
                            f"give a new folder (nothing is deleted here)")
    m = cfg.model
    graph = tf.Graph()
    with graph.as_default():
        z_in = tf1.placeholder(tf.float32, [None, m.z_dim], "z_in")  # dynamic batch
        scope = sampling.weights_scope(cfg, weights, run_dir)
        images_out = sampling.inference_images(z_in, m, scope)  # [None, S, S, 3] uint8
        signature = tf1.saved_model.predict_signature_def({"z": z_in}, {"images": images_out})
        # Restored and written, never run: the CPU's session, whatever the machine has.
        with tf1.Session(graph=graph, config=device.session_config(device.plan("cpu"))) as sess:
            sampling.restore_generator(sess, graph, prefix, run_dir, scope)
            try:
                builder = tf1.saved_model.Builder(export_dir)
                builder.add_meta_graph_and_variables(
                    sess, [tf1.saved_model.tag_constants.SERVING],
                    signature_def_map={"serving_default": signature}, strip_default_attrs=True)
                builder.save()
            except tf.errors.OpError as e:  # TensorFlow's own file errors are not OSErrors
                raise runs.RunError(f"--export '{export_dir}' cannot be written: "
                                    f"{e.message.splitlines()[0]}") from None
    # Not read by TensorFlow: what a user needs to feed the model, and where it came from.
    extra = os.path.join(export_dir, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, "satgan.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(prefix), "step": step,
                   "weights": sampling.describe_weights(cfg, scope), "z_dim": m.z_dim,
                   "z_dist": m.z_dist, "image_size": m.image_size, "config": cfg.to_dict()},
                  f, indent=1)
        f.write("\n")
    S = m.image_size
    return (f"exported the generator (step {step}, {sampling.describe_weights(cfg, scope)}) to "
            f"{export_dir}: signature serving_default, "
            f"z float32 [None, {m.z_dim}] ({m.z_dist}) -> images uint8 [None, {S}, {S}, 3]")


# ---------------------------------------------------------------- command line

EPILOG = """\
outputs:
  samples        fake-000000.png, fake-000001.png, ... (one tile each, the model's size)
  --turing       quiz.png (real and generated tiles), answer.png (fakes framed in red),
                 answer.json (fake positions as [row, col], the real file of each other
                 cell, pattern, checkpoint, step, seed)
  --interpolate  interpolation.png (one row per segment of a closed loop through the
                 points, --frames columns), interpolation.gif (the loop, looping forever)
  --export       a TF SavedModel; load it with
                   m = tf.saved_model.load(DIR)
                   images = m.signatures["serving_default"](z=tf.constant(z))["images"]
                 z: float32 [N, z_dim] drawn like training (model.z_dist: uniform -1..1 or
                 normal); images: uint8 [N, S, S, 3]. In TF1 style:
                 tf.compat.v1.saved_model.loader.load(sess, ["serve"], DIR).
                 DIR/assets.extra/satgan.json holds z_dim, z_dist and the run's config.

The N pattern: fakes fill the left and right columns and the diagonal from top-left to
bottom-right, as in the write-up. Real tiles come from a manifest's holdout split when it
has one (tiles the generator never trained on), else its train split.
Interpolation is spherical (slerp): latents keep their typical length, where a straight
line would pass through shorter vectors than the generator ever saw. With uniform latents
a point midway may leave the -1..1 cube (coordinates up to about 1.5), which the
generator takes in its stride.
Quiz tiles and grids are upscaled (nearest neighbour) to at least 64 px, the GIF to 128 px.
Files of these names in --out are overwritten; nothing else there is touched."""

# option -> (mode it belongs to, default)
MODE_OPTIONS = {"n": ("samples", 64), "real": ("turing", None), "split": ("turing", None),
                "rows": ("turing", 6), "cols": ("turing", 6), "pattern": ("turing", "N"),
                "points": ("interpolate", 4), "frames": ("interpolate", 16)}


def parse_args(argv):
    p = ArgumentParser(
        prog="generate.py",
        description="Images from a trained satgan checkpoint: samples, a Turing quiz,\n"
                    "latent interpolations, or a SavedModel export.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PREFIX_OR_RUN_DIR",
                   help="a checkpoint prefix (RUN/checkpoints/model-500) or a run folder "
                        "(its newest checkpoint)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--turing", action="store_true",
                      help="a quiz grid of real and generated tiles, the answer kept apart")
    mode.add_argument("--interpolate", action="store_true",
                      help="slerp between random latent points: a grid and a GIF")
    mode.add_argument("--export", metavar="DIR",
                      help="write a TF SavedModel of the generator to DIR")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (created if needed); not with --export")
    p.add_argument("--weights", choices=config_lib.GENERATOR_WEIGHTS,
                   help="the generator's averaged weights (the default when the run kept them, "
                        "train.g_average) or its trained ones")
    p.add_argument("-n", type=int, metavar="N", help="samples: number of images (default 64)")
    p.add_argument("--batch-size", type=int, metavar="B", default=64,
                   help=f"images per session run (default 64, at most {MAX_BATCH}); the images "
                        f"do not depend on it")
    p.add_argument("--seed", type=int, metavar="S", default=0,
                   help="seeds the latents, the quiz pattern and the choice of reals (default 0)")
    p.add_argument("--threads", type=int, metavar="T", default=0,
                   help="intra-op threads (default: all cores below 4, else cores - 1)")
    p.add_argument("--real", metavar="PATH[:SPLIT]",
                   help="turing: real tiles, a folder or a manifest.csv, or PATH:SPLIT as "
                        "evaluate.py takes it, e.g. data:holdout (resized to the model's size)")
    p.add_argument("--split", metavar="NAME",
                   help="turing: manifest split of --real (default: holdout if the manifest "
                        "has it, else train; '' = every row)")
    p.add_argument("--rows", type=int, metavar="R", help="turing: grid rows (default 6)")
    p.add_argument("--cols", type=int, metavar="C", help="turing: grid columns (default 6)")
    p.add_argument("--pattern", choices=("N", "random"),
                   help="turing: where the fakes go, the letter N (default) or random "
                        "(seeded, as many fakes as the N)")
    p.add_argument("--points", type=int, metavar="P", help="interpolate: latent points (default 4)")
    p.add_argument("--frames", type=int, metavar="F",
                   help="interpolate: frames per segment (default 16)")
    args = p.parse_args(argv)

    chosen = "turing" if args.turing else "interpolate" if args.interpolate else \
        "export" if args.export else "samples"
    for name, (owner, default) in MODE_OPTIONS.items():
        flag = "-n" if name == "n" else f"--{name}"
        if getattr(args, name) is not None and owner != chosen:
            p.error(f"{flag} belongs to the {owner} mode" +
                    ("" if owner == "samples" else f" (add --{owner})"))
        if getattr(args, name) is None:
            setattr(args, name, default)
    if chosen == "export" and args.out:
        p.error("--export writes to its own DIR; drop --out")
    if chosen != "export" and not args.out:
        p.error("give --out DIR")
    if chosen == "turing" and not args.real:
        p.error("--turing needs --real PATH, a folder or manifest of real tiles")
    minimum = {"n": 1, "batch_size": 1, "seed": 0, "threads": 0, "rows": 3, "cols": 3,
               "points": 2, "frames": 2}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            flag = "-n" if name == "n" else f"--{name.replace('_', '-')}"
            p.error(f"{flag} must be >= {low}, got {getattr(args, name)}")
    grids = {"turing": ("rows", "cols"), "interpolate": ("points", "frames")}
    if chosen in grids:  # one picture holds them all: its size is what runs out
        a, b = grids[chosen]
        cells = getattr(args, a) * getattr(args, b)
        if cells > MAX_CELLS:
            p.error(f"--{a} {getattr(args, a)} x --{b} {getattr(args, b)} makes {cells:,} "
                    f"pictures in one image; at most {MAX_CELLS:,}")
    args.mode = chosen
    config_lib.expand_home(args, ("checkpoint", "out", "real", "export"))
    return args


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or config_lib.default_threads()  # Lesson 28
    if args.mode == "export":
        prefix, run_dir = runs.resolve_checkpoint(args.checkpoint)
        cfg = runs.read_run_config(run_dir)
        print(export_saved_model(prefix, run_dir, cfg, args.export, runs.checkpoint_step(prefix),
                                 args.weights))
        return 0
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise runs.RunError(f"--out '{args.out}' is a file; give a folder")
    runs.check_creatable(args.out)  # made only once every check has passed: a refusal leaves nothing
    gen = sampling.Generator(args.checkpoint, run_batch(args), threads, args.weights)
    try:
        make = {"samples": make_samples, "turing": make_quiz, "interpolate": make_interpolation}
        print(make[args.mode](gen, args))
        print(f"checkpoint: {gen.prefix} (step {gen.step}), the generator's {gen.weights}")
    finally:
        gen.close()
    return 0


def run_batch(args):
    """--batch-size, cut to the images the mode makes and to MAX_BATCH (the images do not
    depend on it; a batch of millions only exhausts memory)."""
    needed = {"samples": args.n, "turing": args.rows * args.cols,
              "interpolate": args.points * args.frames}[args.mode]
    return min(args.batch_size, needed, MAX_BATCH)


def cli(argv=None):
    return run_main(main, argv, errors=(OSError,))  # an --out it cannot write, say


if __name__ == "__main__":
    sys.exit(cli())
