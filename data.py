"""Training tiles: found, validated and held as one uint8 NHWC array.

Every file is read once at start-up (Lesson 4) with PIL (Lesson 13), checked
(Lesson 7: grayscale, alpha, palette, 16-bit, corrupt and undersized files;
TIFFs that are scenes rather than tiles, which prepare.py must cut first)
with every problem reported at once by file name, and brought to
image_size x image_size RGB: a non-square image is cut to its centred square
first (the shorter side; the rest of the image is not used), then area-averaged.
Pixels stay uint8 0..255 here: the graph scales them exactly once (Lessons 8,
12, 29).

Messages about unusable files end with what to do, in the words of the script
that was run: `Advice` holds that wording, train.py's (data.* keys) by default.

Batches are a pure function of (seed, step), so a resumed run draws exactly
the batches an uninterrupted one would, whether tiles sit in memory or are
read from disk by a background thread.
"""
import csv
import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import rasterio
from PIL import Image, ImageOps
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
TIFF_EXTENSIONS = (".tif", ".tiff")
MANIFEST = "manifest.csv"
MAX_LISTED = 20  # problem files named in one error before "and N more"
UNREADABLE = "cannot be read as an image"

# TIFF tiles rarely carry a georeference; rasterio's warning about that is noise here.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


class DataError(UserError):
    """The training data cannot be used; the message names the files."""


class TileError(ValueError):
    """One file cannot be used as a tile; the message says why."""


@dataclass(frozen=True)
class Advice:
    """What a user can do about unusable data, in the terms of the script they ran.

    The defaults speak to train.py, whose data come from the config's data.*
    keys; `option_advice` speaks to a script that takes them from an option.
    """
    source: str = "data path"  # names the data in "<source> '<path>' does not exist"
    missing: str = ("set data.path to a folder of tiles (e.g. --set data.path=data) "
                    "or prepare one with prepare.py")
    grayscale: str = "use colour tiles, or set data.grayscale=convert to replicate it to RGB"
    gray_as_rgb: str = "set data.grayscale=convert to train on it as colour"
    small: str = "use larger images, or a smaller model.image_size (and data.load_size)"
    unreadable: str = "set data.bad_files=skip to drop unreadable files"
    run_folder: str = "set data.path to a folder of tiles"
    raster: str = ("cut it into tiles first: python prepare.py FOLDER --out tiles, then "
                   "--set data.path=tiles")
    band: str = ("cut its scene into tiles first: python prepare.py RED.TIF GREEN.TIF "
                 "BLUE.TIF --out tiles, then --set data.path=tiles")


TRAIN_ADVICE = Advice()


def option_advice(option):
    """Advice for images given by a command-line option such as --real.

    Grayscale files have one remedy there: colour ones. Converted to RGB they
    would still be grayscale stored as RGB, which is refused the same way.
    """
    return Advice(source=option,
                  missing=f"give {option} a folder of tiles or a manifest.csv "
                          f"(prepare.py makes one)",
                  grayscale=f"give {option} colour images",
                  gray_as_rgb=f"give {option} colour images",
                  small=f"give {option} larger images",
                  unreadable=f"remove or replace them in {option}",
                  run_folder=f"give {option} a folder of tiles (generate.py and evaluate.py "
                             f"take a run's generator with --checkpoint)",
                  raster=f"cut it into tiles first (python prepare.py FOLDER --out tiles) and "
                         f"give {option} the tiles",
                  band=f"cut its scene into tiles first (python prepare.py RED.TIF GREEN.TIF "
                       f"BLUE.TIF --out tiles) and give {option} the tiles")


# ---------------------------------------------------------------- finding files

def find_images(path, split="train", advice=TRAIN_ADVICE):
    """Image files under `path`: a folder (recursive), or a manifest.csv split.

    A folder holding a manifest.csv is read through its manifest, so the
    bundled sample's holdout tiles never leak into training. Hidden files and
    folders (names starting with '.') are left out; symlinked folders are
    followed, each real folder once, so a link loop ends. A run folder of
    train.py is refused: its sample grids are not tiles.
    """
    if not os.path.exists(path):
        raise DataError(f"{advice.source} '{path}' does not exist; {advice.missing}")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
        path = os.path.join(path, MANIFEST)
    if os.path.isfile(path):
        if os.path.basename(path).lower().endswith(".csv"):
            return _manifest_files(path, split)
        return [path]
    files = []
    for root, names in walk(path):
        if is_run_folder(root, names):
            raise DataError(f"'{root}' is a run folder of train.py: its samples/ hold grids of "
                            f"fakes, not tiles; {advice.run_folder}")
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f"no image files (.png, .jpg, .tif, ...) found under '{path}'")
    return files


def fingerprint(files, root):
    """A digest of a tile set: each file's name below `root` and its size, in order."""
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def is_run_folder(root, names):
    """Whether folder `root`, holding files `names`, is a run folder of train.py."""
    return "config.json" in names and os.path.isdir(os.path.join(root, "checkpoints"))


def walk(folder):
    """(folder, its file names) for `folder` and every folder below it, sorted.

    Hidden files and folders (names starting with '.') are left out; symlinked
    folders are followed, each real folder once, so a link loop ends.
    """
    walked = set()  # real paths of the folders read so far
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:  # a link back up (a loop) or to a folder already read
            dirs.clear()
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield root, sorted(n for n in names if not n.startswith("."))


HOLDOUT = "holdout"  # the split prepare.py keeps apart from training


def parse_set(text):
    """(path, split or None) from PATH or PATH:SPLIT; "all" is every manifest row ("")."""
    if os.path.exists(text) or ":" not in text:
        return text, None
    path, split = text.rsplit(":", 1)
    if not path or not split:
        raise DataError(f"'{text}' is neither an existing path nor PATH:SPLIT (e.g. data:holdout)")
    return path, "" if split == "all" else split


def is_manifest(path):
    """Whether `path` is read through a manifest: a .csv file, or a folder holding one."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, MANIFEST))
    return path.lower().endswith(".csv")


def manifest_splits(path):
    """The splits a folder's or file's manifest.csv names; empty for a plain folder."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not (os.path.isfile(path) and path.lower().endswith(".csv")):
        return set()
    return {row.get("split", "") for row in read_manifest(path)}


def comparison_split(path):
    """The split fakes are compared with: the holdout when the manifest has one (tiles
    the generator never trained on), else "train"; "" for a plain folder."""
    splits = manifest_splits(path)
    if not splits:
        return ""
    return HOLDOUT if HOLDOUT in splits else "train"


def describe_set(path, split):
    """How messages name an image set: the path, and the split of a manifest."""
    if not is_manifest(path):
        return path
    return f"{path} (split {split})" if split else f"{path} (every row)"


def read_manifest(path):
    """The rows of a manifest.csv as dicts, column names and values stripped of spaces.

    UTF-8 with or without a byte-order mark (as spreadsheets save it);
    anything else is a DataError naming the file.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"manifest '{path}' cannot be read as a UTF-8 CSV file ({e}); save it as "
                        f"UTF-8 text with the columns file,source,x,y,split") from None
    return [{name.strip(): value.strip() if isinstance(value, str) else ""
             for name, value in row.items() if name is not None} for row in rows]


def _manifest_files(path, split):
    folder = os.path.dirname(os.path.abspath(path))
    rows = read_manifest(path)
    for column in ("file", "split") if split else ("file",):
        if rows and column not in rows[0]:
            raise DataError(f"manifest '{path}' has no '{column}' column (expected "
                            f"file,source,x,y,split)" + (f", so no rows of split '{split}'; read "
                                                         f"every row with an empty split"
                                                         if column == "split" else ""))
    chosen = [(line, r) for line, r in enumerate(rows, start=2)
              if not split or r.get("split", "") == split]
    if not chosen:
        splits = sorted({r.get("split", "") for r in rows})
        raise DataError(f"manifest '{path}' has no rows of split '{split}'; "
                        f"it has: {', '.join(map(repr, splits)) or 'no rows'}")
    unnamed = [str(line) for line, r in chosen if not r["file"]]
    if unnamed:
        raise DataError(f"manifest '{path}' has rows without a file name (line "
                        f"{', '.join(unnamed[:5])}{' ...' if len(unnamed) > 5 else ''}); "
                        f"fill in or delete those rows")
    return [os.path.join(folder, r["file"]) for _, r in chosen]


# ---------------------------------------------------------------- reading one tile

def read_tile(path, image_size, grayscale="error", advice=TRAIN_ADVICE):
    """One file as uint8 [image_size, image_size, 3]; TileError says why not.

    A non-square image is cut to its centred square before area averaging
    (see `_fit`).
    """
    if path.lower().endswith(TIFF_EXTENSIONS):
        problem, remedy = _scene_raster(path, advice)
        if problem:
            raise TileError(f"{problem}; {remedy}")
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)  # as a viewer shows it (EXIF orientation)
            array, mode = _to_rgb(upright, grayscale, advice)
    except TileError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise TileError(f"{UNREADABLE} ({e})") from None
    if array.ndim == 3 and grayscale == "error" and _is_gray(array) and mode != "gray":
        raise TileError(f"is grayscale stored as RGB (all channels equal); {advice.gray_as_rgb}")
    return _fit(array, image_size, advice)


def _scene_raster(path, advice=TRAIN_ADVICE):
    """(what the TIFF is, what to do) when it is a scene or a band as remote-sensing pipelines
    write them, which PIL would misread: a fourth band as transparency (GDAL marks it alpha by
    default, so a near-infrared band is taken for one), 16-bit colour as its high bytes, a
    georeferenced 16-bit band as a grayscale tile. (None, None) for a tile PIL reads right:
    8-bit RGB, and grayscale or palette files, which are checked as such."""
    try:
        with rasterio.open(path) as ds:
            colour = [i for i in ds.colorinterp if i != ColorInterp.alpha]
            count, dtype, georeferenced = ds.count, ds.dtypes[0], ds.crs is not None
            interps = [i.name for i in ds.colorinterp]
    except RasterioError:
        return None, None   # PIL's own reading says what is wrong with it
    if len(colour) == 1 and dtype != "uint8" and georeferenced:
        return f"is a georeferenced single-band {dtype} raster (a band of a scene), not an " \
               f"8-bit RGB tile", advice.band
    if count > 3:
        extra = ", ".join(f"band {b} {interp}" for b, interp in enumerate(interps[3:], 4))
        return f"is a {count}-band {dtype} raster ({extra}), not an 8-bit RGB tile", \
            advice.raster
    if len(colour) < 2 or (len(colour) == 3 and dtype == "uint8"):
        return None, None
    return f"is a {count}-band {dtype} raster, not an 8-bit RGB tile", advice.raster


def _to_rgb(img, grayscale, advice=TRAIN_ADVICE):
    """(uint8 HxWx3, kind) from any PIL mode, or TileError."""
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise TileError(f"has transparent pixels ({mode} with alpha < 255); "
                            f"cut tiles without no-data areas (prepare.py drops them)")
        img = img.convert("RGB" if mode == "RGBA" else "L")
        mode = img.mode
    if mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        if grayscale != "convert":
            raise TileError(f"is grayscale (mode {mode}); {advice.grayscale}")
        gray = _gray_to_u8(img)
        return np.repeat(gray[:, :, None], 3, axis=2), "gray"
    if mode != "RGB":
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return np.asarray(img, np.uint8), "rgb"


def _gray_to_u8(img):
    if img.mode == "1":
        return np.asarray(img.convert("L"), np.uint8)
    values = np.asarray(img)
    if values.dtype == np.uint8:
        return values
    if img.mode == "F":
        if values.min() < 0 or values.max() > 1:
            raise TileError("is a floating-point image outside 0..1; convert it to 8-bit first")
        return np.round(values * 255).astype(np.uint8)
    # 16-bit: the full 0..65535 range maps to 0..255. Mode I holds 32-bit
    # values (or a 16-bit file's, as older Pillow reads them): beyond 0..65535
    # the range widens to min(0, lowest)..highest, so no value is clipped.
    low, high = min(0, int(values.min())), max(65535, int(values.max()))
    scaled = (values.astype(np.float32) - low) * np.float32(255 / (high - low))  # 0..255
    return np.round(scaled).astype(np.uint8)


def _is_gray(rgb):
    return np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def _fit(rgb, size, advice=TRAIN_ADVICE):
    """The centred square of the image (the shorter side; a 16x100 image keeps
    its middle 16x16), area-averaged to size x size; smaller images are refused."""
    h, w = rgb.shape[:2]
    if min(h, w) < size:
        raise TileError(f"is {w}x{h}, smaller than the {size}x{size} tile size; {advice.small}")
    if (h, w) == (size, size):
        return rgb
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(np.ascontiguousarray(rgb[top:top + side, left:left + side]))
    return np.asarray(square.resize((size, size), Image.BOX), np.uint8)


# ---------------------------------------------------------------- loading a set

def read_files(files, image_size, grayscale="error", keep_pixels=True, advice=TRAIN_ADVICE):
    """Read and check every file, in parallel: (uint8 [N, S, S, 3] or None, {index: problem})."""
    tiles = np.empty((len(files), image_size, image_size, 3), np.uint8) if keep_pixels else None

    def read(i):
        try:
            tile = read_tile(files[i], image_size, grayscale, advice)
        except TileError as e:
            return i, str(e)
        if keep_pixels:
            tiles[i] = tile
        return i, None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = {i: problem for i, problem in pool.map(read, range(len(files))) if problem}
    return tiles, problems


def listing(lines):
    """The first MAX_LISTED lines, indented, and how many more there are."""
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return "  " + "\n  ".join(lines[:MAX_LISTED]) + more


def unusable(subject, files, problems, advice=TRAIN_ADVICE):
    """DataError "<subject> cannot be used", then one line per file and its problem.

    When some files cannot be read at all, the first line says what to do
    about those (`advice.unreadable`), however many lines follow.
    """
    unreadable = sum(problem.startswith(UNREADABLE) for problem in problems.values())
    todo = f" ({unreadable} cannot be read; {advice.unreadable})" if unreadable else ""
    return DataError(f"{subject} cannot be used{todo}:\n"
                     + listing([f"{files[i]}: {problems[i]}" for i in sorted(problems)]))


def load_tiles(path, split="train", image_size=64, grayscale="error", bad_files="error",
               min_count=1, keep_pixels=True, log=print, advice=TRAIN_ADVICE):
    """All tiles as uint8 [N, S, S, 3] (or the file list only, keep_pixels=False).

    Every file is read and checked before training starts; all problems are
    reported together, each with what to do in the words of `advice`.
    Returns (tiles_or_None, files).
    """
    files = find_images(path, split, advice)
    tiles, found = read_files(files, image_size, grayscale, keep_pixels, advice)
    skipped = sorted(i for i, problem in found.items()
                     if bad_files == "skip" and problem.startswith(UNREADABLE))
    problems = {i: problem for i, problem in found.items() if i not in skipped}
    if problems:
        raise unusable(f"{len(problems)} of {len(files)} files under '{path}'", files, problems,
                       advice)
    if skipped:
        names = ", ".join(files[i] for i in skipped[:MAX_LISTED])
        log(f"skipped {len(skipped)} unreadable files (data.bad_files=skip): {names}")
        keep = np.setdiff1d(np.arange(len(files)), skipped)
        files = [files[i] for i in keep]
        tiles = tiles[keep] if keep_pixels else None
    if len(files) < min_count:
        raise DataError(f"'{path}' holds {len(files)} usable tiles, fewer than one batch of "
                        f"{min_count}; add tiles or lower train.batch_size")
    return tiles, files


# ---------------------------------------------------------------- batches

def batch_indices(step, batch_size, count, seed):
    """Tile indices of batch `step`: consecutive slices of per-epoch shuffles."""
    start = step * batch_size
    out = np.empty(batch_size, np.int64)
    filled = 0
    while filled < batch_size:
        epoch, pos = divmod(start + filled, count)
        perm = np.random.default_rng([seed, epoch]).permutation(count)
        take = min(batch_size - filled, count - pos)
        out[filled:filled + take] = perm[pos:pos + take]
        filled += take
    return out


def augment(batch_u8, rng):
    """Random member of the dihedral group per image: 4 turns x optional flip."""
    choice = rng.integers(0, 8, len(batch_u8))
    out = batch_u8.copy()
    for k in range(1, 8):
        idx = np.nonzero(choice == k)[0]
        if idx.size:
            turned = np.rot90(batch_u8[idx], k % 4, axes=(1, 2))
            out[idx] = turned[:, :, ::-1] if k >= 4 else turned
    return out


def random_crops(batch_u8, size, rng):
    """One random size x size window of each image [N, L, L, C]; L == size returns the batch.

    With data.load_size, D learns from windows of the tiles at their own
    resolution: far more distinct images than the tiles, and no area averaging.
    """
    n, side = len(batch_u8), batch_u8.shape[1]
    if side == size:
        return batch_u8
    rows, cols = rng.integers(0, side - size + 1, (2, n))
    return np.stack([img[r:r + size, c:c + size] for img, r, c in zip(batch_u8, rows, cols)])


class Batches:
    """uint8 batches [B, S, S, 3] by step, from memory or from disk.

    From disk (tiles=None), the batch of step t+1 is read by a background
    thread while step t trains (Lesson 4); the pixels are the same either way.
    """

    def __init__(self, tiles, files, batch_size, image_size, seed, grayscale="error"):
        self.tiles, self.files = tiles, files
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.grayscale = grayscale
        self._next = None  # (step, future) of the prefetched batch
        self._pool = ThreadPoolExecutor(max_workers=1) if tiles is None else None

    def __len__(self):
        return len(self.files)

    def _read(self, step):
        idx = batch_indices(step, self.batch_size, len(self.files), self.seed)
        if self.tiles is not None:
            return self.tiles[idx]
        return np.stack([self._read_file(i) for i in idx])

    def _read_file(self, i):
        try:
            return read_tile(self.files[i], self.image_size, self.grayscale)
        except TileError as e:  # it passed the start-up check: it changed since
            raise DataError(f"{self.files[i]} {e}, though it could be read when training "
                            f"started") from None

    def get(self, step):
        if self._pool is None:
            return self._read(step)
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            batch = self._read(step)
        self._next = (step + 1, self._pool.submit(self._read, step + 1))
        return batch

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------- pictures out

def grid_columns(n):
    """Columns of an about square grid of n pictures with no ragged last row where
    a divisor of n allows it (32 -> 8 x 4, 64 -> 8 x 8, 31 -> 6 + ragged)."""
    square = int(np.ceil(np.sqrt(n)))
    for cols in range(square, 2 * square + 1):
        if n % cols == 0:
            return cols
    return square


def image_grid(images_u8, gap=2, cols=None):
    """[N, H, W, C] -> one uint8 picture, row-major, `cols` per row (default
    `grid_columns`), with thin white gaps."""
    n, h, w, c = images_u8.shape
    cols = cols or grid_columns(n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, c), 255, np.uint8)
    for i, img in enumerate(images_u8):
        r, col = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = img
    return grid


def png_bytes(picture_u8):
    buf = io.BytesIO()
    Image.fromarray(picture_u8).save(buf, format="PNG")
    return buf.getvalue()
