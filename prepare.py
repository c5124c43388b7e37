"""Cut satellite imagery into small RGB PNG tiles, with a spatially separate holdout split.

    python prepare.py SOURCE... --out DIR        (python prepare.py --help for the details)

Writes DIR/train/*.png, DIR/holdout/*.png and DIR/manifest.csv (file,source,x,y,split).
Options, paths and image headers are checked before the first tile is cut; pixels (a
truncated file, a band without variation) when their scene is tiled. The output is built in a
sibling folder that replaces DIR's outputs only when all went well and some tile went to train,
so a bad input never leaves a half-written or empty DIR behind.
"""
import argparse
import contextlib
import csv
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import config as config_lib
import data

SPLITS = ("train", "holdout")
OUTPUTS = (*SPLITS, "manifest.csv")     # what --overwrite replaces in DIR; nothing else
MANIFEST_COLUMNS = ("file", "source", "x", "y", "split")
AUTO = "auto"                           # --nodata's default, see scene_nodata
BAND_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}   # single-band 16/32-bit: stretched bands
GRAY_MODES = {"1", "L", "LA", "La"}
CONVERTED = {"1": "L", "La": "LA", "P": "RGB", "PA": "RGBA", "RGBX": "RGB", "RGBa": "RGBA",
             "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
KEPT_MODES = {"L", "LA", "RGB", "RGBA"}  # what ImagePixels reads strips from
STRETCH_SAMPLE_PX = 1_000_000           # pixels per band that decide a scene's stretch
PROGRESS_EVERY_S = 5.0

HELP = """\
SOURCE is one of:
  an 8-bit image (PNG, JPEG, TIFF, BMP, WebP, GIF) of any size, one scene.
      Palette and RGBA images become RGB (alpha 0 = no data); grayscale needs
      --grayscale convert.
  single-band 16-bit files (e.g. Landsat GeoTIFF bands): every three in a row
      form one scene, in the order red, green, blue, and must have the same
      size. Each band is stretched to 0..255 between --percentiles of the
      scene's valid pixels, computed once per scene.
  a folder: every image file below it (searched recursively, as train.py
      finds tiles) is tiled on its own, and the holdout takes whole files.

Tiles of --source-tile pixels are cut every --stride pixels and shrunk to
--tile pixels by area averaging. A tile with any no-data pixel (all bands equal
to --nodata, or alpha 0) is dropped; by default --nodata is 0 for band files and
single images, whose borders outside the imaged area hold 0, and off for the
files of a folder, tiles whose black pixels are imagery. For the holdout each
scene is divided into square blocks of --block pixels; blocks taken in seeded
random order go to the holdout until they hold about --holdout of the scene's
tiles, and only tiles lying wholly inside one block are kept, so no train tile
overlaps a holdout tile even when --stride is smaller than --source-tile.

Output: DIR/train/*.png, DIR/holdout/*.png, DIR/manifest.csv with columns
file (relative to DIR), source, x, y (top-left pixel in the source), split.
DIR must lie outside every SOURCE folder. A run that keeps no tile for training
(e.g. every tile had no-data pixels) is an error and writes nothing. A band file
without variation (every pixel the same value) cannot be stretched: an error.

examples:
  # natural-colour Landsat-8 (R=B4, G=B3, B=B2), two scenes (bash)
  python prepare.py L8/*_224077_*_B{4,3,2}.TIF L8/*_224078_*_B{4,3,2}.TIF --out data
  # 256x256 map tiles at 0.5 m -> 64x64
  python prepare.py downloads/tiles --source-tile 256 --out tiles64
"""


class PrepareError(Exception):
    """A problem with the user's input: printed as one line naming the file, exit code 2."""


@dataclass
class Scene:
    name: str            # start of its tile file names, unique within a run
    source: str          # what the manifest's source column says
    paths: list          # one image, or the red, green and blue band files
    size: tuple          # (width, height) in pixels
    holdout: bool | None = None  # fixed split of a file from a tile folder; None: by blocks

    @property
    def from_folder(self):
        return self.holdout is not None


@dataclass
class Counts:
    scenes: int = 0
    folder_files: int = 0
    kept: Counter = field(default_factory=Counter)  # split -> tiles written
    no_data: int = 0      # tiles with a no-data pixel
    uniform: int = 0      # tiles below --min-std
    block_edge: int = 0   # tiles crossing a holdout block edge
    too_small: int = 0    # scenes or files smaller than --source-tile
    first_too_small: tuple | None = None  # (source, (width, height)) of the first of them


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- reading images

@contextlib.contextmanager
def no_pixel_limit():
    """PIL refuses images above Image.MAX_IMAGE_PIXELS as possible decompression bombs. A
    scene the user names on the command line is big on purpose, so lift the limit for it."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def unreadable(path, error):
    if isinstance(error, FileNotFoundError):
        return PrepareError(f"{path}: no such file; check the path")
    if isinstance(error, Image.UnidentifiedImageError):
        return PrepareError(f"{path}: not a PNG, JPEG or TIFF image, or a corrupt one; "
                            f"replace or remove it")
    return PrepareError(f"{path}: cannot read the image ({error}); replace or remove it")


def read_header(path):
    """(mode, (width, height)) without decoding the pixels."""
    try:
        with no_pixel_limit(), Image.open(path) as img:
            deep_colour = (img.mode in ("RGB", "RGBA")
                           and any(";16" in str(tile.args) for tile in img.tile))
            mode, size = img.mode, img.size
    except (OSError, SyntaxError, ValueError) as error:
        raise unreadable(path, error) from None
    if deep_colour:  # Pillow keeps only the high byte of each 16-bit colour value
        raise PrepareError(f"{path}: a 16-bit colour image, which Pillow reads as 8 bits (dark "
                           f"and coarse when the data use a small part of the 16-bit range); "
                           f"give its red, green and blue as 16-bit single-band files, which "
                           f"are stretched, or convert it to 8-bit RGB")
    return mode, size


def load_image(path):
    """The whole decoded image. PIL reads from our own file object, so the decoded pixels
    stay usable after the file is closed."""
    try:
        with no_pixel_limit(), open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img
    except (OSError, SyntaxError, ValueError) as error:
        raise unreadable(path, error) from None


class ImagePixels:
    """An 8-bit scene kept as one decoded PIL image (about the size of the uint8 scene);
    row strips are copied out as needed, so no second copy of the whole scene is made."""

    def __init__(self, img, nodata):
        mode = CONVERTED.get(img.mode, img.mode)
        if img.mode == "P" and "transparency" in img.info:
            mode = "RGBA"
        self.img = img if mode == img.mode else img.convert(mode)
        self.nodata = nodata

    def _rows(self, y0, y1):
        """(colour (h, W, 1 or 3), alpha (h, W) or None) of rows y0..y1."""
        arr = np.asarray(self.img.crop((0, y0, self.img.width, y1)))
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
        if self.img.mode.endswith("A"):
            return arr[..., :-1], arr[..., -1]
        return arr, None

    def rgb_rows(self, y0, y1):
        colour, _ = self._rows(y0, y1)
        return np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour

    def nodata_rows(self, y0, y1):
        colour, alpha = self._rows(y0, y1)
        nodata = np.zeros(colour.shape[:2], bool)
        if alpha is not None:
            nodata |= alpha == 0
        if self.nodata is not None:
            nodata |= np.all(colour == self.nodata, axis=2)
        return nodata


class BandPixels:
    """Three single-band rasters (red, green, blue). Each is stretched to 0..255 between
    percentiles computed once over the whole scene, so all its tiles share one stretch."""

    def __init__(self, bands, paths, nodata, percentiles):
        self.bands = bands      # 3 x (H, W) integers
        self.nodata = nodata
        self.limits = stretch_limits(bands, paths, nodata, percentiles)

    def rgb_rows(self, y0, y1):
        rgb = np.empty((y1 - y0, self.bands[0].shape[1], 3), np.uint8)
        for c, (band, (low, high)) in enumerate(zip(self.bands, self.limits)):
            scale = 255 / (high - low)
            rgb[..., c] = np.clip((band[y0:y1].astype(np.float32) - low) * scale, 0, 255).round()
        return rgb

    def nodata_rows(self, y0, y1):
        if self.nodata is None:
            return np.zeros((y1 - y0, self.bands[0].shape[1]), bool)
        return np.logical_and.reduce([band[y0:y1] == self.nodata for band in self.bands])


def stretch_limits(bands, paths, nodata, percentiles):
    """Per band (low, high) at the given percentiles of the valid pixels. A strided subsample
    of about STRETCH_SAMPLE_PX pixels keeps this cheap on big scenes. A band whose low and
    high coincide cannot be stretched (it would come out black): an error naming its file."""
    height, width = bands[0].shape
    step = max(1, math.ceil(math.sqrt(height * width / STRETCH_SAMPLE_PX)))
    samples = np.stack([band[::step, ::step].ravel() for band in bands])  # (3, n)
    if nodata is not None:
        samples = samples[:, ~np.all(samples == nodata, axis=0)]
    if samples.shape[1] == 0:
        return [(0, 1)] * 3      # all no data: every tile is dropped anyway
    limits = []
    for band, path, sample in zip(bands, paths, samples):
        low, high = np.percentile(sample, percentiles)
        if high <= low:
            raise flat_band(path, band, bands, nodata, low, percentiles)
        limits.append((low, high))
    return limits


def flat_band(path, band, bands, nodata, value, percentiles):
    """The error for a band that cannot be stretched: constant, or nearly so."""
    if nodata is not None:      # judged on every pixel with data, not only on the subsample
        band = band[~np.logical_and.reduce([b == nodata for b in bands])]
    if band.min() == band.max():
        return PrepareError(f"{path}: every pixel with data holds the same value ({value:g}), "
                            f"so the band cannot be stretched to 0..255; check that this is the "
                            f"right band file, or leave this scene out")
    low, high = percentiles
    return PrepareError(f"{path}: its {low:g} and {high:g} percentiles are both {value:g} (most "
                        f"pixels hold this one value), so the band cannot be stretched between "
                        f"them; widen --percentiles (e.g. --percentiles 0 100)")


def open_pixels(scene, args):
    nodata = scene_nodata(scene, args)
    if len(scene.paths) == 3:
        bands = [np.asarray(load_image(path)) for path in scene.paths]
        return BandPixels(bands, scene.paths, nodata, args.percentiles)
    return ImagePixels(load_image(scene.paths[0]), nodata)


def scene_nodata(scene, args):
    """--nodata; by default 0 for band files and single images, whose borders outside the
    imaged area hold 0, and none for the files of a folder: tiles, whose black pixels are
    shadow or water (a stretched 8-bit tile has them)."""
    if args.nodata != AUTO:
        return args.nodata
    return None if scene.from_folder else 0


# ---------------------------------------------------------------- finding scenes

def unique_name(name, taken):
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}-{n}"
    taken.add(unique)
    return unique


def band_scene_name(paths):
    """Common start of the band file names, cut at a separator: LC08_..._RT_B4/_B3/_B2 ->
    LC08_..._RT."""
    prefix = os.path.commonprefix([path.stem for path in paths])
    cut = max(prefix.rfind(sep) for sep in "_-.")
    return prefix[:cut] if cut > 0 else paths[0].stem


def check_image_mode(path, mode, args, in_folder=False):
    """An image mode prepare.py cannot tile is a PrepareError naming the file. (16-bit band
    files named as SOURCEs never get here: collect_scenes groups them first.)"""
    if mode in BAND_MODES:
        raise PrepareError(f"{path}: a single-band {mode} image inside a tile folder; name band "
                           f"files as SOURCE arguments instead, three per scene (red green blue)")
    if mode in GRAY_MODES and args.grayscale == "error":
        bands = "" if in_folder else (" (8-bit single-band files are not combined into a "
                                      "scene's red, green and blue: 16-bit ones are)")
        raise PrepareError(f"{path}: grayscale image; add --grayscale convert to copy its gray "
                           f"into all three channels, or remove it{bands}")
    if CONVERTED.get(mode, mode) not in KEPT_MODES:
        raise PrepareError(f"{path}: unsupported pixel mode {mode!r}; save it as 8-bit RGB, or "
                           f"as 16-bit single-band files")


def band_scene(bands, taken):
    (red, size), *others = bands
    for path, other_size in others:
        if other_size != size:
            raise PrepareError(
                f"{path}: {other_size[0]} x {other_size[1]} pixels, but the red band {red} is "
                f"{size[0]} x {size[1]}; the three bands of a scene must have the same size")
    paths = [path for path, _ in bands]
    return Scene(unique_name(band_scene_name(paths), taken), "+".join(p.name for p in paths),
                 paths, size)


def check_band_groups_complete(bands, before=None):
    if bands:
        where = f" before {before}" if before else " at the end"
        raise PrepareError(f"{bands[0][0]}: single-band files form scenes in groups of three "
                           f"(red green blue), but {len(bands)} came in a row{where}; "
                           f"list three band files per scene")


def is_prepare_manifest(path):
    """Whether `path` is a manifest.csv written by prepare.py (judged by its header)."""
    try:
        with open(path, newline="", errors="replace") as f:
            return next(csv.reader(f), None) == list(MANIFEST_COLUMNS)
    except OSError:
        return False


def image_files(folder):
    """Image files below `folder`, sorted, found as the training loader finds them
    (data.walk: hidden files and folders left out, symlinked folders followed). The
    output of an earlier run below it is refused: its tiles would be tiled again (a
    folder that is itself such an output, named on purpose, is fine); so is a run
    folder of train.py."""
    files = []
    for root, names in data.walk(folder):
        root = Path(root)
        if data.is_run_folder(root, names):
            raise PrepareError(f"{root} is a run folder of train.py: its sample grids and loss "
                               f"plot are not imagery; name as SOURCEs only the folders to tile")
        if "manifest.csv" in names and root != folder and is_prepare_manifest(root / "manifest.csv"):
            raise PrepareError(f"{root}: the output of an earlier prepare.py run lies "
                               f"inside the source folder {folder}, and its tiles would be tiled "
                               f"again; move it out of {folder}, or name as SOURCEs only the "
                               f"folders to tile")
        files += [root / n for n in names
                  if n.lower().endswith(data.IMAGE_EXTENSIONS) and (root / n).is_file()]
    return sorted(files)


def folder_scenes(folder, args, taken):
    """Each image file below `folder` is a scene of its own; the holdout takes whole files."""
    files = image_files(folder)
    if not files:
        raise PrepareError(f"{folder}: no image files (PNG, JPEG, TIFF, BMP, WebP, GIF) found "
                           f"(searched recursively); check the folder")
    log(f"folder {folder}: {len(files):,} image files")
    n_held = math.floor(args.holdout * len(files) + 0.5)  # half up: 5 files at 0.1 hold one
    held = set(random.Random(args.seed).sample(range(len(files)), n_held))
    scenes, problems = [], []
    for i, path in enumerate(files):
        try:
            size = checked_folder_file(path, args)
        except PrepareError as e:  # every bad file of the folder is named in one error
            problems.append(str(e))
            continue
        relative = path.relative_to(folder)
        name = unique_name("_".join(relative.with_suffix("").parts), taken)
        source = f"{folder.resolve().name}/{relative.as_posix()}"
        scenes.append(Scene(name, source, [path], size, holdout=i in held))
    if len(problems) == 1:
        raise PrepareError(problems[0])
    if problems:
        raise PrepareError(f"{folder}: {len(problems)} of its {len(files):,} image files cannot "
                           f"be used; fix or remove them:\n" + data.listing(problems))
    return scenes


def checked_folder_file(path, args):
    """(width, height) of a file found in a tile folder, or PrepareError saying what is wrong."""
    mode, size = read_header(path)
    check_image_mode(path, mode, args, in_folder=True)
    # Files found in a folder keep PIL's decompression-bomb limit: a tile folder from a
    # downloader is untrusted, and a huge file there is more likely a mistake than a tile.
    if Image.MAX_IMAGE_PIXELS and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        raise PrepareError(f"{path}: {size[0]} x {size[1]} pixels is too big for a file in "
                           f"a tile folder; name it as a SOURCE of its own to tile it")
    return size


def collect_scenes(sources, args):
    """Check every SOURCE (headers only, so this is quick) and turn it into scenes."""
    scenes, bands, taken = [], [], set()
    for source in sources:
        path = Path(source)
        if path.is_dir():
            check_band_groups_complete(bands, before=path)
            scenes += folder_scenes(path, args, taken)
            continue
        if not path.is_file():
            raise PrepareError(f"{path}: no such file or folder; check the path")
        mode, size = read_header(path)
        if mode in BAND_MODES:
            bands.append((path, size))
            if len(bands) == 3:
                scenes.append(band_scene(bands, taken))
                bands = []
            continue
        check_band_groups_complete(bands, before=path)
        check_image_mode(path, mode, args)
        scenes.append(Scene(unique_name(path.stem, taken), path.name, [path], size))
    check_band_groups_complete(bands)
    check_nodata_reachable(scenes, args)
    return scenes


def check_nodata_reachable(scenes, args):
    """A --nodata above 255 can only match the values of 16-bit band files."""
    if args.nodata in (AUTO, None) or args.nodata <= 255:
        return
    for scene in scenes:
        if len(scene.paths) == 1:
            raise PrepareError(f"--nodata {args.nodata} can never match the 8-bit pixels of "
                               f"{scene.paths[0]} (0..255); give a value in 0..255, or none")


# ---------------------------------------------------------------- tiling

def downsample(tile, size):
    """Area-average an (S, S, 3) uint8 tile to (size, size, 3)."""
    s = tile.shape[0]
    if s == size:
        return tile
    if s % size == 0:
        k = s // size
        means = tile.reshape(size, k, size, k, 3).mean(axis=(1, 3), dtype=np.float32)
        return means.round().astype(np.uint8)
    # Not a whole factor: PIL's box filter weighs each source pixel by the area it covers.
    img = Image.fromarray(np.ascontiguousarray(tile))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def nodata_cells(pixels, width, height, cell):
    """(height // cell, width // cell) bools, True where a cell holds a no-data pixel. Tile
    corners and sizes are whole cells, so checking a tile is a lookup instead of a re-read."""
    rows, cols = height // cell, width // cell
    cells = np.zeros((rows, cols), bool)
    rows_per_read = max(1, 64 // cell)   # strips of about 64 pixel rows bound the memory
    for r0 in range(0, rows, rows_per_read):
        r1 = min(rows, r0 + rows_per_read)
        nodata = pixels.nodata_rows(r0 * cell, r1 * cell)[:, :cols * cell]
        cells[r0:r1] = nodata.reshape(r1 - r0, cell, cols, cell).any(axis=(1, 3))
    return cells


def block_of(x, y, size, block):
    """(column, row) of the holdout block holding the tile, or None if it crosses an edge."""
    bx, by = x // block, y // block
    if (x + size - 1) // block != bx or (y + size - 1) // block != by:
        return None
    return bx, by


def pick_holdout_blocks(tiles_per_block, fraction, rng):
    """Go through the blocks in seeded random order; a block joins the holdout when that
    brings the holdout's tile count closer to `fraction` of all tiles."""
    target = fraction * sum(tiles_per_block.values())
    order = sorted(tiles_per_block)
    rng.shuffle(order)
    held, count = set(), 0
    for block in order:
        if abs(count + tiles_per_block[block] - target) < abs(count - target):
            held.add(block)
            count += tiles_per_block[block]
    return held


def plan_tiles(scene, cells, cell, args, counts):
    """{(x, y): split} for the scene's usable tiles: no no-data pixel, and (when blocks
    split the scene) wholly inside one holdout block."""
    width, height = scene.size
    src, stride = args.source_tile, args.stride
    by_blocks = not scene.from_folder and args.holdout > 0
    blocks = {}
    for y in range(0, height - src + 1, stride):
        for x in range(0, width - src + 1, stride):
            if cells[y // cell:(y + src) // cell, x // cell:(x + src) // cell].any():
                counts.no_data += 1
                continue
            block = block_of(x, y, src, args.block) if by_blocks else None
            if by_blocks and block is None:
                counts.block_edge += 1
                continue
            blocks[(x, y)] = block
    if not by_blocks:
        split = "holdout" if scene.holdout else "train"
        return {xy: split for xy in blocks}
    rng = random.Random(f"{args.seed}/{scene.name}")
    held = pick_holdout_blocks(Counter(blocks.values()), args.holdout, rng)
    if blocks and not held:
        log(f"  warning: no holdout block in {scene.source}; a smaller --block gives finer "
            f"choices")
    return {xy: "holdout" if block in held else "train" for xy, block in blocks.items()}


def tile_scene(scene, args, out, manifest, counts, progress):
    width, height = scene.size
    src = args.source_tile
    if width < src or height < src:
        counts.too_small += 1
        counts.first_too_small = counts.first_too_small or (scene.source, scene.size)
        return
    pixels = open_pixels(scene, args)
    cell = math.gcd(args.stride, src)
    plan = plan_tiles(scene, nodata_cells(pixels, width, height, cell), cell, args, counts)
    xs_by_row = defaultdict(list)
    for x, y in sorted(plan):
        xs_by_row[y].append(x)
    for y, xs in sorted(xs_by_row.items()):
        strip = pixels.rgb_rows(y, y + src)  # (src, W, 3) uint8
        for x in xs:
            tile = downsample(strip[:, x:x + src], args.tile)
            if args.min_std and tile.std() < args.min_std:
                counts.uniform += 1
                continue
            split = plan[(x, y)]
            file = f"{split}/{scene.name}_x{x:05d}_y{y:05d}.png"
            Image.fromarray(tile).save(out / file, optimize=True)
            manifest.writerow([file, scene.source, x, y, split])
            counts.kept[split] += 1
            progress(counts)


def make_progress():
    """A callback printing the tile count to stderr at most every PROGRESS_EVERY_S seconds."""
    last = None

    def progress(counts):
        nonlocal last
        if last is None:
            last = time.monotonic()
        elif time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            log(f"  {counts.kept.total():,} tiles written")
    return progress


def band_roles(paths):
    """', red=B4.TIF green=B3.TIF blue=B2.TIF' for a band scene, so the grouping can be checked."""
    if len(paths) != 3:
        return ""
    roles = zip(("red", "green", "blue"), paths)
    return ", " + " ".join(f"{role}={path.name}" for role, path in roles)


def write_tiles(scenes, out, args):
    counts, progress = Counts(), make_progress()
    for split in SPLITS:
        (out / split).mkdir()
    with open(out / "manifest.csv", "w", newline="") as f:
        manifest = csv.writer(f)
        manifest.writerow(MANIFEST_COLUMNS)
        for i, scene in enumerate(scenes, 1):
            if not scene.from_folder:
                counts.scenes += 1
                log(f"scene {i}/{len(scenes)}: {scene.name} ({scene.size[0]} x {scene.size[1]} px"
                    f"{band_roles(scene.paths)})")
            else:
                counts.folder_files += 1
            tile_scene(scene, args, out, manifest, counts, progress)
    return counts


# ---------------------------------------------------------------- output folder

def check_out_apart(sources, out):
    """Refuse an --out that a source folder holds (the next run on that folder would tile
    these tiles again), and a source that this run's outputs would replace."""
    out_path = out.resolve()
    for source in sources:
        path = Path(source).resolve()
        if path.is_dir() and (out_path == path or path in out_path.parents):
            where = "is the source folder itself" if out_path == path else \
                f"lies inside the source folder {source}"
            raise PrepareError(f"{out}: --out {where}, so its tiles would be mixed with the "
                               f"source images; choose an --out outside {source}")
        for name in OUTPUTS:
            replaced = out_path / name
            if path == replaced or replaced in path.parents:
                raise PrepareError(f"{source}: lies inside {out / name}, which a run with --out "
                                   f"{out} replaces; choose another --out, or move the source "
                                   f"out of {out}")


def check_out(out, overwrite):
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"{out}: folder is not empty; choose another --out, or add "
                           f"--overwrite to replace its train/, holdout/ and manifest.csv")


def publish(staging, out):
    """Swap the finished outputs into `out`; other files there (e.g. a README) stay."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        os.replace(staging / name, old)


def prepare(scenes, args):
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to DIR and swap in at the end: a failure half-way leaves DIR untouched.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        counts = write_tiles(scenes, staging, args)
        check_kept(counts, scenes, args)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def check_kept(counts, scenes, args):
    """Refuse to publish a tile folder that training cannot use: no tile at all, or none for
    training. The error says why, so the user can fix the options or the imagery."""
    if counts.kept["train"]:
        return
    where = scenes[0].source if len(scenes) == 1 else f"any of the {len(scenes):,} scenes/files"
    if counts.kept["holdout"]:
        block = ", use a smaller --block" if any(not s.from_folder for s in scenes) else ""
        raise PrepareError(f"all {counts.kept['holdout']:,} tile(s) from {where} went to the "
                           f"holdout and none to train; lower --holdout {args.holdout:g}{block} "
                           f"or add imagery; nothing was written")
    reasons = []
    if counts.too_small:
        source, (width, height) = counts.first_too_small
        more = f" (and {counts.too_small - 1:,} more)" if counts.too_small > 1 else ""
        reasons.append(f"{source}{more} is {width} x {height} pixels, smaller than --source-tile "
                       f"{args.source_tile}: choose a smaller --source-tile and --tile")
    if counts.no_data:
        only_reason = not (counts.uniform or counts.block_edge)
        every = "every tile" if only_reason else f"{counts.no_data:,} tiles"
        marks = {None: "alpha 0", AUTO: "all bands 0 in band files and single images, or alpha 0"
                 }.get(args.nodata, f"all bands equal to --nodata {args.nodata}, or alpha 0")
        reasons.append(f"{every} had no-data pixels ({marks}): check that the imagery holds "
                       f"data, or set --nodata to its no-data value ('none' turns it off)")
    if counts.uniform:
        reasons.append(f"{counts.uniform:,} tiles were near-uniform: lower --min-std "
                       f"{args.min_std:g}")
    if counts.block_edge:
        reasons.append(f"{counts.block_edge:,} tiles crossed a holdout block edge: use a larger "
                       f"--block or --holdout 0")
    raise PrepareError(f"no tile kept from {where}: {'; '.join(reasons)}; nothing was written")


def summary(counts, args):
    kept = counts.kept.total()
    inputs = [f"{n:,} {what}" for n, what in ((counts.scenes, "scene(s)"),
                                               (counts.folder_files, "file(s) from folders")) if n]
    lines = [f"done: {' and '.join(inputs)} -> {kept:,} tiles in {args.out}",
             f"  kept     {counts.kept['train']:,} train, {counts.kept['holdout']:,} holdout",
             f"  dropped  {counts.no_data:,} with no-data pixels, {counts.uniform:,} near-uniform "
             f"(--min-std), {counts.block_edge:,} crossing a holdout block edge"]
    if counts.too_small:
        lines.append(f"  skipped  {counts.too_small:,} scene(s)/file(s) smaller than --source-tile")
    if counts.no_data and counts.no_data * 4 >= kept + counts.no_data and args.nodata is not None:
        lines.append("  note     a quarter or more of the tiles had no-data pixels; if those "
                     "pixels are imagery (true black), run again with --nodata none")
    if args.holdout > 0 and not counts.kept["holdout"]:
        lines.append(f"  warning  no holdout tile although --holdout {args.holdout:g}: too few "
                     f"files or blocks gave tiles (evaluations fall back to the train tiles)")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def parse_nodata(text):
    if text.lower() == "none":
        return None
    if text.lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'none'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0, which no pixel holds")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="prepare.py", description="Cut satellite imagery into RGB PNG tiles for training.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="8-bit image, single-band file (three per scene) or folder of tiles")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder, outside every SOURCE folder")
    p.add_argument("--tile", type=int, default=64, metavar="N",
                   help="output tile size in pixels (default 64)")
    p.add_argument("--source-tile", type=int, metavar="N",
                   help="size of the tiles cut from a source, area-averaged down to --tile "
                        "(default: --tile)")
    p.add_argument("--stride", type=int, metavar="N",
                   help="step between tiles in source pixels (default: --source-tile)")
    p.add_argument("--holdout", type=float, default=0.1, metavar="F",
                   help="fraction of each scene's tiles held out, as whole blocks (default 0.1)")
    p.add_argument("--block", type=int, metavar="N",
                   help="holdout block size in source pixels (default: 8 x --source-tile)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for choosing holdout blocks and files (default 0)")
    p.add_argument("--nodata", type=parse_nodata, default=AUTO, metavar="V",
                   help="a pixel is no data when all its bands hold V; 'none' turns this off "
                        "(default auto: 0 for band files and single images, none for the "
                        "files of a folder)")
    p.add_argument("--min-std", type=float, default=0.0, metavar="S",
                   help="drop near-uniform tiles: std of the 8-bit tile pixels below S "
                        "(default 0: off)")
    p.add_argument("--percentiles", type=float, nargs=2, default=(2.0, 98.0),
                   metavar=("LOW", "HIGH"),
                   help="stretch of single-band files: these percentiles -> 0 and 255 "
                        "(default 2 98)")
    p.add_argument("--grayscale", choices=("error", "convert"), default="error",
                   help="grayscale images: refuse them (default) or copy gray to R, G and B")
    p.add_argument("--overwrite", action="store_true",
                   help="replace train/, holdout/ and manifest.csv in a non-empty DIR "
                        "(other files there are kept)")
    args = p.parse_args(argv)
    config_lib.expand_home(args, ("sources", "out"))
    for option, value in (("--tile", args.tile), ("--source-tile", args.source_tile),
                          ("--stride", args.stride), ("--block", args.block)):
        if value is not None and value < 1:
            p.error(f"{option} {value} must be at least 1 (pixels)")
    if args.source_tile is None:
        args.source_tile = args.tile
    if args.stride is None:
        args.stride = args.source_tile
    if args.block is None:
        args.block = 8 * args.source_tile
    if args.source_tile < args.tile:
        p.error(f"--source-tile {args.source_tile} is smaller than --tile {args.tile}; "
                f"tiles are only ever shrunk")
    if not 0 <= args.holdout < 1:
        p.error(f"--holdout {args.holdout} must be a fraction with 0 <= F < 1 (e.g. 0.1)")
    if args.block < args.source_tile:
        p.error(f"--block {args.block} must be at least --source-tile {args.source_tile}")
    if not 0 <= args.percentiles[0] < args.percentiles[1] <= 100:
        p.error("--percentiles LOW HIGH must satisfy 0 <= LOW < HIGH <= 100")
    if not 0 <= args.min_std < math.inf:      # also refuses nan
        p.error(f"--min-std {args.min_std} must be a finite number, 0 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        check_out_apart(args.sources, args.out)
        check_out(args.out, args.overwrite)
        scenes = collect_scenes(args.sources, args)
        counts = prepare(scenes, args)
    except PrepareError as error:
        print(f"prepare.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:    # reading errors became PrepareError: this is the output side
        print(f"prepare.py: error: cannot write to {args.out} ({error}); check the folder and "
              f"the free disk space", file=sys.stderr)
        return 2
    print(summary(counts, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
