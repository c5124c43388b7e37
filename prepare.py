"""Cut satellite imagery into small RGB PNG tiles, with a spatially separate holdout split.

    python prepare.py SOURCE... --out DIR        (python prepare.py --help for the details)

Reads any raster GDAL reads, through rasterio. Writes DIR/train/*.png, DIR/holdout/*.png and
DIR/manifest.csv (file, source, x, y, split, and where the source is georeferenced its crs,
the tile's bounds in it and its centre's lon, lat). Options, paths and headers are checked
before the first tile is cut; pixels (a truncated file, a band without variation) when their
scene is tiled. The output is built in a sibling folder that replaces DIR's outputs only when
all went well and some tile went to train, so a bad input never leaves a half-written or
empty DIR behind.
"""
import argparse
import csv
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio import warp
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.transform import xy
from rasterio.windows import Window

import config as config_lib
import data
from cli import ArgumentParser, UserError, run_main

# Plain PNG and JPEG tiles carry no georeference; that is expected, not worth a warning.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)

SPLITS = ("train", "holdout")
OUTPUTS = (*SPLITS, "manifest.csv")     # what --overwrite replaces in DIR; nothing else
MANIFEST_COLUMNS = ("file", "source", "x", "y", "split",
                    "crs", "left", "bottom", "right", "top", "lon", "lat")
AUTO = "auto"                           # --nodata's and --stretch's default
DEFAULT_BANDS = (1, 2, 3)               # --bands of a multi-band file
FOLDER_EXTENSIONS = (*data.IMAGE_EXTENSIONS, ".jp2")   # the files of a source folder
OVERVIEW_PX = 4_000_000                 # pixels of the reduced read deciding collar and stretch
NEAR_BLACK_LOSSY = 15                   # --near-black of lossy 8-bit data, as GDAL's nearblack
STRETCH_SAMPLE_PX = 1_000_000           # pixels per band that decide a scene's stretch
PROGRESS_EVERY_S = 5.0

HELP = """\
SOURCE is one of:
  a raster file GDAL reads (GeoTIFF or COG of any compression, JPEG2000, PNG,
      JPEG, VRT, ...), of any size and band count, one scene. --bands picks
      its red, green and blue (default 1,2,3; a note names the bands left
      out). A palette becomes its colours; a grayscale image needs
      --grayscale convert.
  single-band files that are not 8-bit (Landsat or Sentinel-2 bands): every
      three in a row form one scene, in the order red, green, blue, and must
      have the same size.
  a folder: every image file below it (searched recursively, as train.py
      finds tiles) is tiled on its own, and the holdout takes whole files.

8-bit data are taken as they are; every other type (uint16, int16, uint32,
float32, float64) is stretched to 0..255 per band between --percentiles of the
scene's valid pixels, once per scene (--stretch on|off forces it or turns it
off: off clips values to 0..255).

No data, the way GDAL sees it: what a file declares (a nodata value, an alpha
band, an internal mask) first. A scene that declares nothing gets the black
collar rule: pixels 0 in every band that connect to the scene's edge (the
collar USGS leaves undeclared) are no data, black pixels inside the imagery
(shadow, water) are not; a folder's files, tiles, get no rule. Lossy codecs
(JPEG, lossy JPEG2000 or WebP, by GDAL's COMPRESSION metadata) decode a black
collar as values just above 0, so 8-bit lossy files take every band at most
--near-black (default 15 for them, 0 otherwise) as black, as GDAL's nearblack
does. --nodata V (every band holds V) or none replaces a declared value and
the collar rule. NaN is always no data. A tile whose share of no-data pixels
exceeds --max-nodata (default 0: any) is dropped. The summary names each
scene's rule.

Tiles of --source-tile pixels are cut every --stride pixels and shrunk to
--tile pixels by area averaging. For the holdout each scene is divided into
square blocks of --block pixels; blocks taken in seeded random order go to the
holdout until they hold about --holdout of the scene's tiles, and only tiles
lying wholly inside one block are kept, so no train tile overlaps a holdout
tile even when --stride is smaller than --source-tile.

Output: DIR/train/*.png, DIR/holdout/*.png, DIR/manifest.csv with columns
file (relative to DIR), source, x, y (top-left pixel in the source), split,
and for georeferenced sources crs, left, bottom, right, top (the tile's bounds
in the crs) and lon, lat (its centre); empty for the others. DIR must lie
outside every SOURCE folder. A run that keeps no tile for training (e.g. every
tile had no-data pixels) is an error and writes nothing. A band without
variation (every pixel the same value) cannot be stretched: an error.

examples:
  # natural-colour Landsat-8 (R=B4, G=B3, B=B2), two scenes (bash)
  python prepare.py L8/*_224077_*_B{4,3,2}.TIF L8/*_224078_*_B{4,3,2}.TIF --out data
  # a 4-band aerial GeoTIFF (red, green, blue, near-infrared)
  python prepare.py survey/rgbn.tif --out tiles
  # a folder of downloaded 256x256 tiles at 0.5 m -> 64x64
  python prepare.py downloads/tiles --source-tile 256 --out tiles64
"""


class PrepareError(UserError):
    """A problem with the user's input: printed as one line naming the file, exit code 2."""


@dataclass
class Scene:
    name: str            # start of its tile file names, unique within a run
    source: str          # what the manifest's source column says
    paths: list          # one raster file, or the red, green and blue band files
    size: tuple          # (width, height) in pixels
    reads: tuple         # (path, band) giving red, green and blue, bands numbered from 1
    dtype: str           # of the pixels as stored: 'uint8', 'uint16', 'float32', ...
    palette: bool = False        # one band of indices into a colour table
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
    rules: Counter = field(default_factory=Counter)  # no-data rule -> scenes or files given it


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- reading rasters

def open_raster(path):
    """An open rasterio dataset, or PrepareError naming the file and GDAL's reason."""
    try:
        return rasterio.open(path)
    except RasterioIOError as error:
        raise PrepareError(f"{path}: GDAL cannot read it ({error}); replace or remove it") from None


@dataclass(frozen=True)
class Header:
    """What deciding a file's role needs, read without decoding a pixel."""
    count: int       # bands, numbered 1..count as GDAL does
    dtype: str       # 'uint8', 'uint16', 'float32', ...
    interp: tuple    # GDAL's colour interpretation of each band: 'red', 'alpha', 'undefined', ...
    size: tuple      # (width, height) in pixels

    @property
    def palette(self):
        return self.interp == ("palette",)

    @property
    def colour_bands(self):
        """The bands holding imagery: all but an alpha band, which marks no data."""
        return [b for b, name in enumerate(self.interp, 1) if name != "alpha"]

    @property
    def is_band(self):
        """One band of a scene: single-band and not 8-bit (8-bit ones are grayscale images)."""
        return len(self.colour_bands) == 1 and self.dtype != "uint8" and not self.palette


def read_header(path):
    with open_raster(path) as ds:
        return Header(ds.count, ds.dtypes[0], tuple(ci.name for ci in ds.colorinterp),
                      (ds.width, ds.height))


def read_band(ds, band, masks=False, **where):
    """One band (or its GDAL mask) in a `window=`, or whole at `out_shape=`; overviews serve
    reduced reads where the file has them. A read GDAL fails is a PrepareError naming the file."""
    try:
        if masks:
            return ds.read_masks(band, resampling=Resampling.nearest, **where)
        return ds.read(band, resampling=Resampling.nearest, **where)
    except RasterioError as error:
        raise PrepareError(f"{ds.name}: GDAL cannot read its pixels ({error}); replace or "
                           f"remove it") from None


@dataclass(frozen=True)
class NodataRule:
    """Which pixels of a scene are no data. Non-finite float pixels always are."""
    declared: str | None   # what the file declares through GDAL's mask ('alpha band', ...)
    value: float | None    # --nodata V: every band holds V
    collar: float | None   # near black (every band within this of 0) and connected to the
    #                        scene's edge; None: no collar rule
    lossy: str | None = None   # the lossy compression that widened the collar's default
    imagery_alpha: int | None = None   # a band marked alpha that holds imagery, so no mask

    def __str__(self):
        parts = [self.declared] if self.declared else []
        if self.imagery_alpha:
            parts.append(f"band {self.imagery_alpha} marked alpha holds imagery (values besides "
                         f"0 and 255), not a mask")
        if self.value is not None:
            parts.append(f"--nodata {self.value:g}")
        if self.collar == 0:
            parts.append("black collar (0 in every band, connected to the edge)")
        elif self.collar is not None:
            why = f"; --near-black default for {self.lossy}" if self.lossy else ""
            parts.append(f"near-black collar (0..{self.collar:g} in every band, connected to "
                         f"the edge{why})")
        return " + ".join(parts) or "none"


def lossy_compression(ds):
    """How `ds` is compressed when that loses detail ('lossy JPEG compression'), else None:
    GDAL's COMPRESSION_REVERSIBILITY where the driver reports it (JPEG2000, WebP, JPEG XL),
    and JPEG, which is always lossy."""
    structure = ds.tags(ns="IMAGE_STRUCTURE")
    compression = structure.get("COMPRESSION", ds.driver)
    reversibility = structure.get("COMPRESSION_REVERSIBILITY", "")
    if reversibility == "LOSSY" or (not reversibility and "JPEG" in compression.upper()):
        return f"lossy {'JPEG' if 'JPEG' in compression.upper() else compression} compression"
    return None


def collar_tolerance(scene, datasets, args):
    """(--near-black, the lossy compression that chose it): GDAL's nearblack idea. A lossless
    file's collar is exactly 0; JPEG and other lossy codecs decode a black collar as values
    just above 0, so 8-bit lossy data get NEAR_BLACK_LOSSY. Other types keep 0, as their
    codecs' errors scale with the data's range; --near-black sets it for them."""
    if args.near_black != AUTO:
        return args.near_black, None
    lossy = next(filter(None, (lossy_compression(datasets[path]) for path in scene.paths)), None)
    if lossy and scene.dtype == "uint8":
        return NEAR_BLACK_LOSSY, lossy
    return 0, None


def alpha_holds_imagery(ds, shape):
    """The number of `ds`'s alpha band when it holds more values than 0 and 255, else None.
    GDAL marks the fourth band of a 4-band 8-bit GeoTIFF alpha unless told otherwise, so an
    aerial survey's near-infrared often arrives as 'alpha'; a real alpha band is a mask."""
    interps = [interp.name for interp in ds.colorinterp]
    if "alpha" not in interps:      # a palette's transparent colour: a mask
        return None
    band = 1 + interps.index("alpha")
    values = read_band(ds, band, out_shape=shape)
    return band if not np.isin(values, (0, 255)).all() else None


def nodata_rule(scene, datasets, args, shape):
    """The field's order: what the file declares (a nodata value, an alpha band, an internal
    mask), else the black collar for a scene (Landsat Level-1 leaves its collar undeclared;
    black inside the imagery is shadow or water), and nothing for a folder's files (tiles,
    whose black is imagery). --nodata V or none replaces a declared value and the collar.
    `shape`: (rows, columns) of the reduced read that judges an alpha band."""
    flags = {flag for path, band in scene.reads
             for flag in datasets[path].mask_flag_enums[band - 1]}
    declared, imagery_alpha = None, None
    if MaskFlags.alpha in flags:
        imagery_alpha = alpha_holds_imagery(datasets[scene.paths[0]], shape)
        declared = None if imagery_alpha else "alpha band"
    elif MaskFlags.nodata in flags and args.nodata == AUTO:
        first = datasets[scene.reads[0][0]]
        declared = f"nodata value {first.nodata:g} declared by the file"
    elif MaskFlags.per_dataset in flags:
        declared = "mask declared by the file"
    value = None if args.nodata in (AUTO, None) else args.nodata
    collar, lossy = None, None
    if args.nodata == AUTO and declared is None and not scene.from_folder:
        collar, lossy = collar_tolerance(scene, datasets, args)
    return NodataRule(declared, value, collar, lossy, imagery_alpha)


def near_black(bands, tolerance):
    """(h, w) bools: every band within `tolerance` of 0 (exactly 0 for tolerance 0)."""
    if tolerance == 0:
        return np.logical_and.reduce([band == 0 for band in bands])
    return np.logical_and.reduce([(band >= -tolerance) & (band <= tolerance) for band in bands])


def spread_along_rows(reached, mask):
    """Every run of `mask` pixels along a row that holds a reached pixel becomes reached."""
    height, width = mask.shape
    padded = np.zeros((height, width + 1), bool)    # a gap after each row ends its last run
    padded[:, :width] = mask
    run = np.cumsum(~padded.ravel())                # the pixels of one run share a number
    hits = np.zeros_like(padded)
    hits[:, :width] = reached
    touched = np.bincount(run, weights=hits.ravel()) > 0
    return mask & touched[run].reshape(height, width + 1)[:, :width]


def edge_connected(mask):
    """The pixels of `mask` joined to the image's edge through 4-connected `mask` pixels: a
    scene's black collar, without the black shadows inside the imagery. A flood fill in pure
    NumPy: sweeps along rows, then columns, until nothing changes (two or three for a collar)."""
    reached = np.zeros_like(mask)
    reached[[0, -1], :] = mask[[0, -1], :]
    reached[:, [0, -1]] |= mask[:, [0, -1]]
    while True:
        grown = spread_along_rows(spread_along_rows(reached, mask).T, mask.T).T
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def grow_by_one(mask):
    """`mask` and its 8 neighbours."""
    tall = mask.copy()
    tall[1:] |= mask[:-1]
    tall[:-1] |= mask[1:]
    grown = tall.copy()
    grown[:, 1:] |= tall[:, :-1]
    grown[:, :-1] |= tall[:, 1:]
    return grown


def overview_shape(width, height):
    """(rows, columns) of a scene's reduced read: at most about OVERVIEW_PX pixels."""
    step = max(1, math.ceil(math.sqrt(width * height / OVERVIEW_PX)))
    return math.ceil(height / step), math.ceil(width / step)


class ScenePixels:
    """A scene's red, green and blue, read from its files in row strips, so memory stays
    bounded whatever the scene's size, as uint8 RGB and a no-data mask.

    What needs the whole scene (the collar, the stretch) is decided once on a reduced read of
    at most OVERVIEW_PX pixels, the scene itself for all but big ones. There the collar is
    found by a flood fill of the black pixels from the edge; at full resolution a pixel is
    collar when it is black and its overview cell or a neighbour is collar, since a cell read
    as imagery can still hold some black collar pixels along the collar's border."""

    def __init__(self, scene, args):
        self.scene = scene
        self.width, self.height = scene.size
        self.datasets = {}
        for path in scene.paths:
            self.datasets[path] = open_raster(path)
        self.lut = palette_lut(self.datasets[scene.paths[0]]) if scene.palette else None
        shape = overview_shape(self.width, self.height)
        self.rule = nodata_rule(scene, self.datasets, args, shape)
        bands = self._bands(out_shape=shape)
        nodata = self._nodata(bands, out_shape=shape)
        self.collar = None
        if self.rule.collar is not None:
            collar = edge_connected(near_black(bands, self.rule.collar))
            nodata |= collar
            self.collar = collar if shape == (self.height, self.width) else grow_by_one(collar)
        stretch = args.stretch == "on" or (args.stretch == AUTO and
                                           any(band.dtype != np.uint8 for band in bands))
        self.limits = stretch_limits(bands, nodata, scene, args.percentiles) if stretch else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for ds in self.datasets.values():
            ds.close()

    def _bands(self, **where):
        """[3 x (h, w)] the red, green and blue values as the files hold them (a palette's
        indices become their colours), in `window=` or whole at `out_shape=`."""
        if self.lut is not None:
            index = read_band(self.datasets[self.scene.paths[0]], 1, **where)
            return [self.lut[:, c][index] for c in range(3)]
        read = {key: read_band(self.datasets[key[0]], key[1], **where)
                for key in dict.fromkeys(self.scene.reads)}   # a gray file's band read once
        return [read[key] for key in self.scene.reads]

    def _nodata(self, bands, **where):
        """(h, w) bools: no data by the rule, the collar aside."""
        nodata = np.zeros(bands[0].shape, bool)
        for band in bands:
            if band.dtype.kind == "f":
                nodata |= ~np.isfinite(band)
        if self.rule.declared:  # GDAL's dataset mask: no data where every band's mask says so
            nodata |= np.logical_and.reduce([
                read_band(self.datasets[path], band, masks=True, **where) == 0
                for path, band in dict.fromkeys(self.scene.reads)])
        if self.rule.value is not None:
            nodata |= np.logical_and.reduce([band == self.rule.value for band in bands])
        return nodata

    def _window(self, y0, y1):
        return {"window": Window(0, y0, self.width, y1 - y0)}

    def nodata_rows(self, y0, y1):
        where = self._window(y0, y1)
        bands = self._bands(**where)
        nodata = self._nodata(bands, **where)
        if self.collar is not None:
            rows = np.arange(y0, y1) * self.collar.shape[0] // self.height
            cols = np.arange(self.width) * self.collar.shape[1] // self.width
            nodata |= near_black(bands, self.rule.collar) & self.collar[np.ix_(rows, cols)]
        return nodata

    def rgb_rows(self, y0, y1):
        """(h, W, 3) uint8: 8-bit values as they are, others stretched (or clipped to 0..255
        with --stretch off); non-finite values become 0."""
        bands = self._bands(**self._window(y0, y1))
        rgb = np.empty((y1 - y0, self.width, 3), np.uint8)
        for c, band in enumerate(bands):
            values = np.nan_to_num(band, nan=0, posinf=0, neginf=0) if band.dtype.kind == "f" \
                else band
            if self.limits is not None:
                low, high = self.limits[c]
                values = (values.astype(np.float32) - low) * np.float32(255 / (high - low))
            rgb[..., c] = values if values.dtype == np.uint8 else np.clip(values, 0, 255).round()
        return rgb

    def places(self, xs, y, size):
        """Per tile at (x, y), x in xs: its crs, left, bottom, right, top (in the crs) and
        centre lon, lat; empty strings where the scene is not georeferenced."""
        ds = self.datasets[self.scene.paths[0]]
        if ds.crs is None:
            return [("",) * 7 for _ in xs]
        cols, row = np.array(xs, float), np.full(len(xs), float(y))
        lefts, tops = xy(ds.transform, row, cols, offset="ul")    # a north-up grid's corners
        rights, bottoms = xy(ds.transform, row + size, cols + size, offset="ul")
        lons, lats = warp.transform(ds.crs, "EPSG:4326",
                                    *xy(ds.transform, row + size / 2, cols + size / 2, offset="ul"))
        crs = ds.crs.to_string()
        bounds = zip(lefts, bottoms, rights, tops)
        return [(crs, *(f"{v:.10g}" for v in box), f"{lon:.7f}", f"{lat:.7f}")
                for box, lon, lat in zip(bounds, lons, lats)]


def palette_lut(ds):
    """(256, 3) uint8 colours of a palette band's indices; entries it leaves out are black."""
    lut = np.zeros((256, 3), np.uint8)
    for index, colour in ds.colormap(1).items():
        lut[index] = colour[:3]
    return lut


def stretch_limits(bands, nodata, scene, percentiles):
    """Per band (low, high) at the given percentiles of the scene's valid pixels, read from
    its reduced read and subsampled to about STRETCH_SAMPLE_PX. A band whose low and high
    coincide cannot be stretched (it would come out black): an error naming its file."""
    valid = ~nodata
    step = max(1, math.ceil(valid.sum() / STRETCH_SAMPLE_PX))
    limits = []
    for band, (path, number) in zip(bands, scene.reads):
        sample = band[valid][::step]
        if sample.size == 0:
            return [(0, 1)] * 3      # all no data: every tile is dropped anyway
        low, high = np.percentile(sample, percentiles)
        if high <= low:
            where = path if len(scene.paths) == 3 else f"{path} band {number}"
            raise flat_band(where, sample, low, percentiles)
        limits.append((low, high))
    return limits


def flat_band(where, sample, value, percentiles):
    """The error for a band that cannot be stretched: constant, or nearly so."""
    if sample.min() == sample.max():
        return PrepareError(f"{where}: every pixel with data holds the same value ({value:g}), "
                            f"so the band cannot be stretched to 0..255; check that this is the "
                            f"right band, or leave this scene out")
    low, high = percentiles
    return PrepareError(f"{where}: its {low:g} and {high:g} percentiles are both {value:g} (most "
                        f"pixels hold this one value), so the band cannot be stretched between "
                        f"them; widen --percentiles (e.g. --percentiles 0 100)")


# ---------------------------------------------------------------- finding scenes

def unique_name(name, taken):
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}-{n}"
    taken.add(unique)
    return unique


NAME_SEPARATORS = "_-."  # between the parts of a band file's name (LC08_..._B4, T21JYN_..._B04_10m)


def band_scene_name(paths):
    """Common start of the band file names, cut at a separator: LC08_..._RT_B4/_B3/_B2 ->
    LC08_..._RT."""
    prefix = os.path.commonprefix([path.stem for path in paths])
    cut = max(prefix.rfind(sep) for sep in NAME_SEPARATORS)
    return prefix[:cut] if cut > 0 else paths[0].stem


def file_reads(path, header, args, in_folder=False):
    """((path, band) x 3): where a file's red, green and blue come from, or PrepareError
    saying why the file cannot give them. (Band files named as SOURCEs never get here:
    collect_scenes groups them first.)"""
    if header.palette:
        return ((path, 1),) * 3
    colour = header.colour_bands
    if len(colour) == 1:
        if header.dtype != "uint8":
            raise PrepareError(f"{path}: a single-band {header.dtype} raster inside a tile "
                               f"folder; name band files as SOURCE arguments instead, three per "
                               f"scene (red green blue)")
        if args.grayscale == "error":
            bands = "" if in_folder else (" (8-bit single-band files are not combined into a "
                                          "scene's red, green and blue: other types are)")
            raise PrepareError(f"{path}: grayscale image; add --grayscale convert to copy its "
                               f"gray into all three channels, or remove it{bands}")
        return ((path, colour[0]),) * 3
    wanted = args.bands or DEFAULT_BANDS
    if max(wanted) > header.count:
        option = "--bands" if args.bands else "the default --bands"
        raise PrepareError(f"{path}: has {header.count} bands, but {option} "
                           f"{','.join(map(str, wanted))} asks for band {max(wanted)}; choose its "
                           f"red, green and blue with --bands R,G,B")
    return tuple((path, band) for band in wanted)


def band_note(path, header, reads):
    """What a multi-band file's unused bands were taken to be, so a wrong guess shows; None
    when every band is used."""
    used = [band for _, band in reads]
    unused = [b for b in range(1, header.count + 1) if b not in used]
    if header.palette or len(header.colour_bands) == 1 or not unused:
        return None

    def named(band):
        interp = header.interp[band - 1]
        return f"{band} ({interp}{', often near-infrared' if interp == 'undefined' else ''})"
    ignored = [named(b) for b in unused if header.interp[b - 1] != "alpha"]
    alpha = [str(b) for b in unused if header.interp[b - 1] == "alpha"]
    parts = [f"red, green, blue from bands {', '.join(map(named, used))}"]
    if ignored:
        parts.append(f"band(s) {', '.join(ignored)} ignored")
    if alpha:
        parts.append(f"band {', '.join(alpha)} (alpha) marks no data if it holds only 0 and "
                     f"255, else it is taken for imagery and ignored")
    return f"{path}: {header.count} bands; " + "; ".join(parts) + " (--bands picks others)"


def file_scene(path, header, args, name, source, holdout=None, in_folder=False):
    reads = file_reads(path, header, args, in_folder)
    dtype = "uint8" if header.palette else header.dtype
    return Scene(name, source, [path], header.size, reads, dtype, header.palette, holdout)


def check_one_acquisition(paths):
    """Three band files named as one scene must be named alike but for the band: a pattern that
    matches two acquisitions (LC08_*_B{4,3,2}.TIF over two dates) lists B4 B4 B3 B3 B2 B2 and
    would pair bands of different days. Names are compared token by token (split at _ - .):
    one token may differ, and then in all three; names of other shapes are not judged."""
    tokens = [re.split(f"[{re.escape(NAME_SEPARATORS)}]", path.stem) for path in paths]
    if len({len(t) for t in tokens}) != 1:
        return
    differing = [set(column) for column in zip(*tokens) if len(set(column)) > 1]
    if len(differing) > 1 or (differing and len(differing[0]) < 3):
        names = ", ".join(path.name for path in paths)
        raise PrepareError(f"{paths[0]}: taken with the next two files as one scene's red, green "
                           f"and blue ({names}), but their names differ in more than the band; "
                           f"list each acquisition's three band files together, e.g. one "
                           f"pattern per acquisition")


def band_scene(bands, taken):
    check_one_acquisition([path for path, _ in bands])
    (red, header), *others = bands
    for path, other in others:
        if other.size != header.size:
            raise PrepareError(
                f"{path}: {other.size[0]} x {other.size[1]} pixels, but the red band {red} is "
                f"{header.size[0]} x {header.size[1]}; the three bands of a scene must have the "
                f"same size")
    paths = [path for path, _ in bands]
    return Scene(unique_name(band_scene_name(paths), taken), "+".join(p.name for p in paths),
                 paths, header.size, tuple((path, h.colour_bands[0]) for path, h in bands),
                 header.dtype)


def check_band_groups_complete(bands, before=None):
    if bands:
        where = f" before {before}" if before else " at the end"
        raise PrepareError(f"{bands[0][0]}: single-band files form scenes in groups of three "
                           f"(red green blue), but {len(bands)} came in a row{where}; "
                           f"list three band files per scene")


def is_prepare_manifest(path):
    """Whether `path` is a manifest.csv written by prepare.py (judged by its header; older
    runs wrote only the first five columns)."""
    try:
        with open(path, newline="", errors="replace") as f:
            header = next(csv.reader(f), None)
    except OSError:
        return False
    return header is not None and header[:5] == list(MANIFEST_COLUMNS[:5])


def image_files(folder):
    """Raster files below `folder`, sorted, found as the training loader finds them
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
                  if n.lower().endswith(FOLDER_EXTENSIONS) and (root / n).is_file()]
    return sorted(files)


def folder_scenes(folder, args, taken):
    """Each raster file below `folder` is a scene of its own; the holdout takes whole files."""
    files = image_files(folder)
    if not files:
        raise PrepareError(f"{folder}: no image files (GeoTIFF, JPEG2000, PNG, JPEG, BMP, WebP, "
                           f"GIF) found (searched recursively); check the folder")
    log(f"folder {folder}: {len(files):,} image files")
    n_held = math.floor(args.holdout * len(files) + 0.5)  # half up: 5 files at 0.1 hold one
    held = set(random.Random(args.seed).sample(range(len(files)), n_held))
    scenes, problems, notes = [], [], []
    for i, path in enumerate(files):
        relative = path.relative_to(folder)
        name = unique_name("_".join(relative.with_suffix("").parts), taken)
        source = f"{folder.resolve().name}/{relative.as_posix()}"
        try:
            header = read_header(path)
            scenes.append(file_scene(path, header, args, name, source, i in held, True))
        except PrepareError as e:  # every bad file of the folder is named in one error
            problems.append(str(e))
            continue
        if not args.bands:
            notes.append(band_note(path, header, scenes[-1].reads))
    if len(problems) == 1:
        raise PrepareError(problems[0])
    if problems:
        raise PrepareError(f"{folder}: {len(problems)} of its {len(files):,} image files cannot "
                           f"be used; fix or remove them:\n" + data.listing(problems))
    notes = [note for note in notes if note]
    if notes:
        more = f" (and {len(notes) - 1:,} more files with unused bands)" if len(notes) > 1 else ""
        log(f"  note: {notes[0]}{more}")
    return scenes


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
        header = read_header(path)
        if header.is_band:
            bands.append((path, header))
            if len(bands) == 3:
                scenes.append(band_scene(bands, taken))
                bands = []
            continue
        check_band_groups_complete(bands, before=path)
        scenes.append(file_scene(path, header, args, unique_name(path.stem, taken), path.name))
        note = None if args.bands else band_note(path, header, scenes[-1].reads)
        if note:
            log(f"note: {note}")
    check_band_groups_complete(bands)
    check_nodata_reachable(scenes, args)
    return scenes


def check_nodata_reachable(scenes, args):
    """A --nodata that no pixel of a scene's type can hold (300 in 8-bit, -1 in unsigned,
    0.5 in integer data) would silently drop nothing."""
    if args.nodata in (AUTO, None):
        return
    for scene in scenes:
        if np.dtype(scene.dtype).kind not in "iu":
            continue
        limits = np.iinfo(scene.dtype)
        if not (limits.min <= args.nodata <= limits.max and args.nodata == int(args.nodata)):
            raise PrepareError(f"--nodata {args.nodata:g} can never match the {scene.dtype} "
                               f"pixels of {scene.paths[0]} ({limits.min}..{limits.max}); give "
                               f"a whole number in that range, or none")


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
    """(height // cell, width // cell) counts of no-data pixels per cell. Tile corners and
    sizes are whole cells, so checking a tile is a sum instead of a re-read."""
    rows, cols = height // cell, width // cell
    cells = np.zeros((rows, cols), np.int64)
    rows_per_read = max(1, 64 // cell)   # strips of about 64 pixel rows bound the memory
    for r0 in range(0, rows, rows_per_read):
        r1 = min(rows, r0 + rows_per_read)
        nodata = pixels.nodata_rows(r0 * cell, r1 * cell)[:, :cols * cell]
        cells[r0:r1] = nodata.reshape(r1 - r0, cell, cols, cell).sum(axis=(1, 3))
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
    """{(x, y): split} for the scene's usable tiles: no more no-data pixels than --max-nodata
    allows, and (when blocks split the scene) wholly inside one holdout block."""
    width, height = scene.size
    src, stride = args.source_tile, args.stride
    allowed = math.floor(args.max_nodata * src * src)
    by_blocks = not scene.from_folder and args.holdout > 0
    blocks = {}
    for y in range(0, height - src + 1, stride):
        for x in range(0, width - src + 1, stride):
            if cells[y // cell:(y + src) // cell, x // cell:(x + src) // cell].sum() > allowed:
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
    with ScenePixels(scene, args) as pixels:
        counts.rules[str(pixels.rule)] += 1
        if not scene.from_folder:
            log(f"  no data: {pixels.rule}")
        cell = math.gcd(args.stride, src)
        plan = plan_tiles(scene, nodata_cells(pixels, width, height, cell), cell, args, counts)
        xs_by_row = defaultdict(list)
        for x, y in sorted(plan):
            xs_by_row[y].append(x)
        for y, xs in sorted(xs_by_row.items()):
            strip = pixels.rgb_rows(y, y + src)  # (src, W, 3) uint8
            for x, place in zip(xs, pixels.places(xs, y, src)):
                tile = downsample(strip[:, x:x + src], args.tile)
                if args.min_std and tile.std() < args.min_std:
                    counts.uniform += 1
                    continue
                split = plan[(x, y)]
                file = f"{split}/{scene.name}_x{x:05d}_y{y:05d}.png"
                Image.fromarray(tile).save(out / file, optimize=True)
                manifest.writerow([file, scene.source, x, y, split, *place])
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
        reasons.append(f"{every} had no-data pixels ({'; '.join(counts.rules)}): check that "
                       f"the imagery holds data, or set --nodata to its no-data value ('none' "
                       f"turns it off) or raise --max-nodata")
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
    lines += [f"  no data  {rule}: {n:,} scene(s)/file(s)" for rule, n in counts.rules.items()]
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
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (NaN is always "
                                         f"no data)")
    return value


def parse_near_black(text):
    if text.lower() == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number 0 or more, or 'auto'")
    return value


def parse_bands(text):
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        bands = ()
    if len(bands) != 3 or min(bands) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not three band numbers from 1, "
                                         f"red,green,blue (e.g. 4,3,2)")
    return bands


def parse_args(argv=None):
    p = ArgumentParser(
        prog="prepare.py",
        description="Cut satellite imagery into RGB PNG tiles for training.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="raster file, single-band file (three per scene) or folder of tiles")
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
    p.add_argument("--bands", type=parse_bands, metavar="R,G,B",
                   help="red, green and blue of a multi-band file, GDAL's band numbers from 1 "
                        "(default 1,2,3)")
    p.add_argument("--nodata", type=parse_nodata, default=AUTO, metavar="V",
                   help="a pixel is no data when all its bands hold V; 'none': no value is "
                        "(default auto: what the file declares, else the black collar of a "
                        "scene; nothing for the files of a folder)")
    p.add_argument("--near-black", type=parse_near_black, default=AUTO, metavar="N",
                   help="the black collar's pixels: every band at most N (default auto: "
                        f"{NEAR_BLACK_LOSSY} for lossy-compressed 8-bit files, else 0)")
    p.add_argument("--max-nodata", type=float, default=0.0, metavar="F",
                   help="keep a tile with at most this fraction of no-data pixels (default 0)")
    p.add_argument("--stretch", choices=(AUTO, "on", "off"), default=AUTO,
                   help="stretch bands between --percentiles: auto (default) for all but "
                        "8-bit data, on for all, off for none (values clipped to 0..255)")
    p.add_argument("--min-std", type=float, default=0.0, metavar="S",
                   help="drop near-uniform tiles: std of the 8-bit tile pixels below S "
                        "(default 0: off)")
    p.add_argument("--percentiles", type=float, nargs=2, default=(2.0, 98.0),
                   metavar=("LOW", "HIGH"),
                   help="stretch of bands: these percentiles -> 0 and 255 "
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
    if not 0 <= args.max_nodata < 1:
        p.error(f"--max-nodata {args.max_nodata} must be a fraction with 0 <= F < 1")
    if not 0 <= args.min_std < math.inf:      # also refuses nan
        p.error(f"--min-std {args.min_std} must be a finite number, 0 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_out_apart(args.sources, args.out)
    check_out(args.out, args.overwrite)
    scenes = collect_scenes(args.sources, args)
    try:
        counts = prepare(scenes, args)
    except OSError as error:  # reading errors became PrepareError: this is the output side
        raise PrepareError(f"cannot write to {args.out} ({error}); check the folder and "
                           f"the free disk space") from None
    print(summary(counts, args))
    return 0


def cli(argv=None):
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
