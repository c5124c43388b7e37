"""prepare.py on small synthetic scenes: tiling, stretch, no-data, area averaging, holdout
separation and bad inputs. Rasters of the kinds the field delivers are written with rasterio
itself. Everything is written under tmp_path; the whole file runs in seconds."""
import csv
import os
import random
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from conftest import run_script as run_repo_script  # noqa: E402


def run(*argv):
    """prepare.py in-process; returns its exit code."""
    return prepare.cli([str(a) for a in argv])


def run_script(*argv):
    """prepare.py as a user runs it, for exit code and stderr."""
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=60)


def manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def noise(height, width, seed=0):
    """RGB uint8 noise with no pure-black pixel (which would count as no data)."""
    return np.random.default_rng(seed).integers(30, 226, (height, width, 3), dtype=np.uint8)


UTM_21S = "EPSG:32721"
ORIGIN = from_origin(500_000, 7_000_000, 30, 30)   # 30 m pixels, like Landsat


def write_raster(path, bands, georeferenced=True, **profile):
    """A raster file of (C, H, W) `bands` as GDAL writes it (a GeoTIFF unless `driver=`)."""
    bands = np.asarray(bands)
    count, height, width = bands.shape
    options = {"driver": "GTiff", "count": count, "height": height, "width": width,
               "dtype": bands.dtype.name, **profile}
    if georeferenced:
        options.update(crs=UTM_21S, transform=ORIGIN)
    with rasterio.open(path, "w", **options) as ds:
        ds.write(bands)
    return path


def save_band(path, band, **profile):
    """A single-band 16-bit file, as USGS writes Landsat bands (no nodata declared)."""
    return write_raster(path, band[None].astype(np.uint16), **profile)


def tile_pixels(out, row):
    return np.asarray(Image.open(out / row["file"]))


def error_text(err):
    """stderr from its one `error:` line on (progress lines may come before it; a listing of
    files after it)."""
    lines = err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, err
    return "\n".join(lines[starts[0]:])


def dropped(out, reason):
    """How many tiles the summary says were dropped for `reason` ('no-data', 'near-uniform')."""
    line = next(line for line in out.splitlines() if line.strip().startswith("dropped"))
    return int(re.search(rf"(\d[\d,]*) [^,\d]*{reason}", line).group(1).replace(",", ""))


def nodata_rules(out):
    """The summary's 'no data' lines: the rule each scene got, and for how many."""
    return "\n".join(line for line in out.splitlines() if line.strip().startswith("no data"))


# ---------------------------------------------------------------- scenes

def test_big_scene_is_read_in_windows_in_bounded_memory(tmp_path, monkeypatch):
    scene = noise(512, 768)
    scene[:, :40] = 0               # a black collar on the left: tiles at x=0 are dropped
    scene[300, 400] = 0             # a black pixel inside the imagery: its tile is kept
    Image.fromarray(scene).save(tmp_path / "big.png")
    # A small overview budget makes this modest scene as big as a 24000 x 12000 mosaic is
    # for the real one: collar and stretch are decided on a reduced read.
    monkeypatch.setattr(prepare, "OVERVIEW_PX", 10_000)

    tracemalloc.start()
    try:
        code = run(tmp_path / "big.png", "--out", tmp_path / "out", "--holdout", 0)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert code == 0
    assert peak_bytes < scene.nbytes
    rows = manifest(tmp_path / "out")
    assert len(rows) == (512 // 64) * (768 // 64 - 1)
    assert all(int(r["x"]) >= 64 for r in rows)
    row = next(r for r in rows if (r["x"], r["y"]) == ("384", "256"))   # holds the black pixel
    assert row["source"] == "big.png" and row["split"] == "train"
    assert np.array_equal(tile_pixels(tmp_path / "out", row), scene[256:320, 384:448])
    assert row["crs"] == row["lon"] == ""                               # a PNG: no georeference


def test_band_files_drop_nodata_collar_and_stretch_by_percentiles(tmp_path, capsys):
    height, width, collar = 256, 320, 10
    rng = np.random.default_rng(1)
    bands = [rng.integers(low, low + 3000, (height, width)) for low in (6000, 7000, 8000)]
    inside = np.zeros((height, width), bool)
    inside[collar:-collar, collar:-collar] = True
    for band in bands:
        band[~inside] = 0          # no-data collar in every band
    paths = [save_band(tmp_path / f"scene_B{n}.tif", band) for n, band in zip((4, 3, 2), bands)]

    assert run(*paths, "--out", tmp_path / "out", "--holdout", 0) == 0

    rows = manifest(tmp_path / "out")
    # 5 x 4 tile positions; only the 3 x 2 inner ones stay clear of the 10-pixel collar.
    assert sorted((int(r["x"]), int(r["y"])) for r in rows) == [
        (x, y) for x in (64, 128, 192) for y in (64, 128)]
    out = capsys.readouterr().out
    assert dropped(out, "no-data") == 14
    assert "collar" in nodata_rules(out)
    assert rows[0]["source"] == "scene_B4.tif+scene_B3.tif+scene_B2.tif"
    assert rows[0]["file"].startswith("train/scene_x")

    tiles = [tile_pixels(tmp_path / "out", r) for r in rows]
    assert min(t.min() for t in tiles) == 0 and max(t.max() for t in tiles) == 255
    for c, band in enumerate(bands):
        low, high = np.percentile(band[inside], [2, 98])
        for row, tile in zip(rows, tiles):
            x, y = int(row["x"]), int(row["y"])
            expected = np.clip((band[y:y + 64, x:x + 64] - low) * 255 / (high - low), 0, 255)
            assert np.abs(tile[..., c] - expected).max() <= 1


def test_rgba_alpha_zero_is_nodata_and_palette_becomes_rgb(tmp_path, capsys):
    rgba = np.dstack([noise(128, 128), np.full((128, 128), 255, np.uint8)])
    rgba[:5, :5, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(noise(128, 64)).convert("P").save(tmp_path / "palette.png")

    assert run(tmp_path / "rgba.png", tmp_path / "palette.png", "--out", tmp_path / "out",
               "--holdout", 0) == 0

    rows = manifest(tmp_path / "out")
    assert [(r["source"], r["x"], r["y"]) for r in rows if r["source"] == "rgba.png"] == [
        ("rgba.png", "64", "0"), ("rgba.png", "0", "64"), ("rgba.png", "64", "64")]
    assert sum(r["source"] == "palette.png" for r in rows) == 2
    assert all(Image.open(tmp_path / "out" / r["file"]).mode == "RGB" for r in rows)
    out = capsys.readouterr().out
    assert dropped(out, "no-data") == 1 and "alpha" in nodata_rules(out)


# ---------------------------------------------------------------- folders of tiles

def test_folder_of_256_tiles_is_area_averaged_to_64(tmp_path):
    folder = tmp_path / "tiles" / "15"
    (folder / "9000").mkdir(parents=True)
    png_tile = noise(256, 256, seed=2)
    Image.fromarray(png_tile).save(folder / "9000" / "1234.png")
    Image.fromarray(noise(256, 256, seed=3)).save(folder / "9000" / "1235.jpg", quality=90)

    assert run(tmp_path / "tiles", "--source-tile", 256, "--tile", 64, "--holdout", 0,
               "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    assert [r["source"] for r in rows] == ["tiles/15/9000/1234.png", "tiles/15/9000/1235.jpg"]
    tile = tile_pixels(tmp_path / "out", rows[0])
    assert tile.shape == (64, 64, 3)
    block_means = png_tile.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(tile - block_means).max() <= 0.5 + 1e-6
    assert tile_pixels(tmp_path / "out", rows[1]).shape == (64, 64, 3)


def test_non_integer_shrink_keeps_area_means(tmp_path):
    (tmp_path / "tiles").mkdir()
    two_tone = np.full((96, 96, 3), 40, np.uint8)
    two_tone[:, 48:] = 200
    Image.fromarray(two_tone).save(tmp_path / "tiles" / "a.png")

    assert run(tmp_path / "tiles", "--source-tile", 96, "--tile", 64, "--holdout", 0,
               "--out", tmp_path / "out") == 0

    tile = tile_pixels(tmp_path / "out", manifest(tmp_path / "out")[0]).astype(float)
    assert tile.shape == (64, 64, 3)
    assert abs(tile.mean() - two_tone.mean()) <= 1
    assert (tile[:, :31] == 40).all() and (tile[:, 33:] == 200).all()


def test_folder_holdout_takes_whole_files(tmp_path):
    (tmp_path / "tiles").mkdir()
    for i in range(10):
        Image.fromarray(noise(128, 128, seed=i)).save(tmp_path / "tiles" / f"{i}.png")

    assert run(tmp_path / "tiles", "--holdout", 0.3, "--out", tmp_path / "out") == 0

    split_of_file = {}
    for row in manifest(tmp_path / "out"):
        split_of_file.setdefault(row["source"], set()).add(row["split"])
    assert len(split_of_file) == 10
    assert all(len(splits) == 1 for splits in split_of_file.values())
    assert sum(splits == {"holdout"} for splits in split_of_file.values()) == 3


@pytest.fixture
def tiles(tmp_path):
    """A folder of three 64x64 tiles."""
    (tmp_path / "tiles").mkdir()
    for i in range(3):
        Image.fromarray(noise(64, 64, seed=i)).save(tmp_path / "tiles" / f"{i}.png")
    return tmp_path / "tiles"


@pytest.mark.parametrize("out_name, extra", [("out", []), (".", ["--overwrite"])])
def test_out_inside_or_equal_to_a_source_folder_is_refused(tiles, capsys, out_name, extra):
    # Tiles written inside the source folder would be tiled again by the next run on it.
    out = tiles / out_name
    code = run(tiles, "--holdout", 0, "--out", out, *extra)
    message = capsys.readouterr().err
    assert code == 2
    assert "--out" in error_text(message) and str(tiles) in error_text(message)
    assert sorted(p.name for p in tiles.iterdir()) == ["0.png", "1.png", "2.png"]


def test_earlier_output_inside_a_source_folder_is_refused(tiles, capsys):
    assert run(tiles, "--holdout", 0, "--out", tiles.parent / "out") == 0
    (tiles.parent / "out").rename(tiles / "out")    # e.g. written there by an older prepare.py
    capsys.readouterr()

    assert run(tiles, "--holdout", 0, "--out", tiles.parent / "again") == 2
    assert str(tiles / "out") in error_text(capsys.readouterr().err)
    assert not (tiles.parent / "again").exists()

    # A prepared folder named as a SOURCE itself is re-tiled on purpose.
    assert run(tiles / "out", "--holdout", 0, "--out", tiles.parent / "again") == 0
    assert len(manifest(tiles.parent / "again")) == 3


def test_source_inside_the_outputs_that_overwrite_replaces_is_refused(tiles, capsys):
    out = tiles.parent / "out"
    assert run(tiles, "--holdout", 0, "--out", out) == 0
    capsys.readouterr()

    assert run(out / "train", "--holdout", 0, "--out", out, "--overwrite") == 2
    message = error_text(capsys.readouterr().err)
    assert str(out / "train") in message and "--out" in message
    assert len(list((out / "train").iterdir())) == 3


def test_min_std_drops_near_uniform_tiles(tmp_path, capsys):
    scene = noise(64, 256)
    scene[:, :128] = 90         # two flat tiles on the left, two textured on the right
    Image.fromarray(scene).save(tmp_path / "flat.png")

    assert run(tmp_path / "flat.png", "--min-std", 2, "--holdout", 0,
               "--out", tmp_path / "out") == 0

    assert [r["x"] for r in manifest(tmp_path / "out")] == ["128", "192"]
    assert dropped(capsys.readouterr().out, "near-uniform") == 2


# ---------------------------------------------------------------- holdout

def footprints(rows, size):
    return [(int(r["x"]), int(r["y"]), int(r["x"]) + size, int(r["y"]) + size) for r in rows]


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_holdout_tiles_never_overlap_train_tiles(tmp_path):
    Image.fromarray(noise(384, 384, seed=4)).save(tmp_path / "scene.png")
    argv = [tmp_path / "scene.png", "--source-tile", 32, "--tile", 16, "--stride", 16,
            "--block", 96, "--holdout", 0.25]

    assert run(*argv, "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    train = footprints([r for r in rows if r["split"] == "train"], 32)
    holdout = footprints([r for r in rows if r["split"] == "holdout"], 32)
    assert train and holdout
    assert 0.1 < len(holdout) / len(rows) < 0.4
    assert not any(overlap(t, h) for t in train for h in holdout)
    assert all((tmp_path / "out" / r["file"]).parent.name == r["split"] for r in rows)

    assert run(*argv, "--out", tmp_path / "again") == 0   # the same seed, the same split
    assert manifest(tmp_path / "again") == rows


def test_pick_holdout_blocks_aims_at_the_fraction():
    tiles_per_block = {(bx, by): 10 for bx in range(5) for by in range(4)}
    held = prepare.pick_holdout_blocks(tiles_per_block, 0.1, random.Random(0))
    assert len(held) == 2
    assert prepare.pick_holdout_blocks(tiles_per_block, 0.0, random.Random(0)) == set()


# ---------------------------------------------------------------- bad inputs

@pytest.fixture
def inputs(tmp_path):
    """A folder of valid and broken inputs."""
    Image.fromarray(noise(128, 128)).save(tmp_path / "good.png")
    Image.fromarray(noise(128, 128)[..., 0]).save(tmp_path / "gray.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    Image.fromarray(noise(256, 256)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])
    save_band(tmp_path / "r.tif", np.full((96, 96), 7000))
    save_band(tmp_path / "g.tif", np.full((96, 96), 7000))
    save_band(tmp_path / "b_small.tif", np.full((96, 80), 7000))
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize("sources, named", [
    (["missing.png"], "missing.png"),
    (["junk.png"], "junk.png"),
    (["truncated.png"], "truncated.png"),      # header fine, pixels cut: fails while tiling
    (["r.tif", "g.tif", "b_small.tif"], "b_small.tif"),
    (["r.tif", "g.tif", "good.png"], "r.tif"),  # only two bands before an image
    (["gray.png"], "gray.png"),
    (["gray.png", "gray.png", "gray.png"], "single-band"),  # says why they form no scene
    (["empty"], "empty"),
])
def test_bad_input_exits_2_naming_it_and_writes_nothing(inputs, capsys, sources, named):
    out = inputs / "out"
    code = run(*[inputs / s for s in sources], "--out", out, "--source-tile", 64)
    message = capsys.readouterr().err
    assert code == 2
    assert named in error_text(message)
    assert not out.exists()
    assert not list(inputs.glob(".out.partial-*"))


def test_bad_input_from_the_command_line_has_no_traceback(inputs):
    for source in ("missing.png", "truncated.png"):
        result = run_script(inputs / source, "--out", inputs / "out")
        assert result.returncode == 2
        assert source in error_text(result.stderr) and "Traceback" not in result.stderr
        assert not (inputs / "out").exists()


def test_every_bad_file_of_a_folder_is_named_in_one_error(inputs, capsys):
    folder = inputs / "tiles"
    folder.mkdir()
    for name in ("good.png", "gray.png", "junk.png"):
        (folder / name).write_bytes((inputs / name).read_bytes())
    assert run(folder, "--out", inputs / "out") == 2
    message = error_text(capsys.readouterr().err)
    named = [line for line in message.splitlines()[1:] if str(folder) in line]
    assert len(named) == 2 and "gray.png" in named[0] and "junk.png" in named[1]
    assert "--grayscale" in named[0]
    assert "single-band" not in message     # a folder's files are never bands
    assert not (inputs / "out").exists()


@pytest.mark.parametrize("value", ["300", "-1", "0.5"])
def test_nodata_no_8_bit_pixel_can_hold_is_refused(inputs, capsys, value):
    assert run(inputs / "good.png", "--nodata", value, "--out", inputs / "out") == 2
    message = error_text(capsys.readouterr().err)
    assert f"--nodata {value}" in message and "good.png" in message and "uint8" in message
    assert not (inputs / "out").exists()


def test_grayscale_convert_copies_gray_to_rgb(inputs):
    assert run(inputs / "gray.png", "--grayscale", "convert", "--holdout", 0,
               "--out", inputs / "out") == 0
    tile = tile_pixels(inputs / "out", manifest(inputs / "out")[0])
    assert tile.shape == (64, 64, 3)
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all()


def test_unknown_option_value_exits_2(inputs):
    with pytest.raises(SystemExit) as exit_info:
        prepare.parse_args([str(inputs / "good.png"), "--out", "x", "--grayscale", "maybe"])
    assert exit_info.value.code == 2


def test_existing_out_is_refused_unless_overwrite(inputs, capsys):
    out = inputs / "out"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    (out / "manifest.csv").write_text("old")

    assert run(inputs / "good.png", "--out", out) == 2
    assert str(out) in error_text(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "manifest.csv"]
    assert (out / "manifest.csv").read_text() == "old"

    assert run(inputs / "good.png", "--out", out, "--overwrite", "--holdout", 0) == 0
    assert (out / "README.md").read_text() == "keep me"
    assert len(manifest(out)) == 4


@pytest.mark.parametrize("option, value", [
    ("--stride", 0), ("--stride", -1), ("--source-tile", 0), ("--block", 0), ("--tile", 0),
    ("--min-std", "nan"), ("--near-black", -1), ("--near-black", "dark"),
])
def test_numeric_option_out_of_range_exits_2_naming_it(inputs, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        prepare.parse_args([str(inputs / "good.png"), "--out", "x", option, str(value)])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


# ---------------------------------------------------------------- nothing to keep

def save_scene(folder, name, pixels):
    Image.fromarray(pixels).save(folder / name)
    return folder / name


@pytest.mark.parametrize("make, named", [
    (lambda d: [save_scene(d, "small.png", noise(40, 50))], ("small.png", "--source-tile")),
    (lambda d: [save_scene(d, "black.png", np.zeros((128, 128, 3), np.uint8))],
     ("black.png", "--nodata", "--max-nodata")),
    (lambda d: [save_band(d / f"zero_B{n}.tif", np.zeros((128, 128))) for n in (4, 3, 2)],
     ("zero_B4.tif", "--nodata")),
    (lambda d: [save_scene(d, "flat.png", np.full((64, 64, 3), 90, np.uint8)),
                "--min-std", 2], ("flat.png", "--min-std")),
], ids=["smaller-than-the-tile", "all-black", "all-zero-bands", "all-near-uniform"])
def test_no_tile_kept_exits_2_saying_why_and_keeps_the_old_output(tmp_path, capsys, make,
                                                                   named):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.csv").write_text("old")

    assert run(*make(tmp_path), "--holdout", 0, "--out", out, "--overwrite") == 2

    message = error_text(capsys.readouterr().err)
    assert all(name in message for name in named)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv"]
    assert (out / "manifest.csv").read_text() == "old"
    assert not list(tmp_path.glob(".out.partial-*"))


def test_no_tile_kept_from_the_command_line_writes_no_manifest(tmp_path):
    save_scene(tmp_path, "small.png", noise(40, 50))
    result = run_script(tmp_path / "small.png", "--out", tmp_path / "out")
    assert result.returncode == 2
    message = error_text(result.stderr)
    assert "small.png" in message and "50 x 40" in message and "--source-tile" in message
    assert not (tmp_path / "out").exists()


def test_all_tiles_in_the_holdout_exits_2(tiles, capsys):
    assert run(tiles / "0.png", "--holdout", 0.9, "--out", tiles.parent / "out") == 2
    message = error_text(capsys.readouterr().err)
    assert "0.png" in message and "--holdout" in message
    assert not (tiles.parent / "out").exists()


def test_band_files_of_two_acquisitions_in_one_pattern_are_refused(tmp_path, capsys):
    """LC08_*_B{4,3,2}.TIF over two dates: bash lists B4 B4 B3 B3 B2 B2, which would pair the
    bands of different days; one error names the files, nothing is written."""
    rng = np.random.default_rng(0)
    names = [f"LC08_L1TP_224077_{day}_02_T1_B{n}.TIF" for n in (4, 3, 2)
             for day in ("20200518", "20200603")]
    paths = [save_band(tmp_path / name, rng.integers(6000, 9000, (128, 128))) for name in names]
    out = tmp_path / "out"
    assert run(*paths, "--holdout", 0, "--out", out) == 2
    message = error_text(capsys.readouterr().err)
    assert all(name in message for name in names[:3]) and "one scene" in message
    assert not out.exists()
    # the same files, one acquisition after the other, make two scenes
    in_order = [tmp_path / f"LC08_L1TP_224077_{day}_02_T1_B{n}.TIF"
                for day in ("20200518", "20200603") for n in (4, 3, 2)]
    assert run(*in_order, "--holdout", 0, "--out", out) == 0
    assert len({row["source"] for row in manifest(out)}) == 2


@pytest.mark.parametrize("stems", [("red", "green", "blue"), ("x_R", "x_G", "x_B"),
                                   ("T21JYN_20200518T135111_B04_10m", "T21JYN_20200518T135111_B03_10m",
                                    "T21JYN_20200518T135111_B02_10m"),
                                   ("a_b4", "a_b3", "other_b2_final")])
def test_band_files_named_alike_but_for_the_band_are_one_scene(stems):
    """Names differing in one token, or of different shapes (not judged), pass."""
    prepare.check_one_acquisition([Path(f"/x/{stem}.tif") for stem in stems])


# ---------------------------------------------------------------- bands without variation

def test_constant_band_is_an_error_naming_its_file(tmp_path, capsys):
    rng = np.random.default_rng(5)
    red = save_band(tmp_path / "s_B4.tif", np.full((64, 64), 7000))
    others = [save_band(tmp_path / f"s_B{n}.tif", rng.integers(6000, 9000, (64, 64)))
              for n in (3, 2)]

    assert run(red, *others, "--holdout", 0, "--out", tmp_path / "out") == 2

    message = error_text(capsys.readouterr().err)
    assert str(red) in message and "7000" in message and "s_B3" not in message
    assert not (tmp_path / "out").exists()


def test_band_flat_between_the_percentiles_suggests_wider_ones(tmp_path, capsys):
    rng = np.random.default_rng(6)
    mostly_flat = np.full((64, 64), 7000)
    mostly_flat[0] = rng.integers(6000, 9000, 64)           # 1.6% of the pixels vary
    bands = [mostly_flat, rng.integers(6000, 9000, (64, 64)), rng.integers(6000, 9000, (64, 64))]
    paths = [save_band(tmp_path / f"s_B{n}.tif", b) for n, b in zip((4, 3, 2), bands)]

    assert run(*paths, "--holdout", 0, "--out", tmp_path / "out") == 2
    assert "--percentiles 0 100" in error_text(capsys.readouterr().err)  # a value that works

    assert run(*paths, "--holdout", 0, "--percentiles", 0, 100, "--out", tmp_path / "out") == 0
    assert len(manifest(tmp_path / "out")) == 1


def test_folder_sources_are_found_as_the_training_loader_finds_them(tmp_path):
    """Hidden folders left out, symlinked folders followed once (a loop ends)."""
    src, other = tmp_path / "src", tmp_path / "other"
    for folder, name in ((src, "a.png"), (src / ".thumbs", "hidden.png"), (other, "b.png")):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(64, 64)).save(folder / name)
    (src / "linked").symlink_to(other, target_is_directory=True)
    (other / "loop").symlink_to(src, target_is_directory=True)
    assert run(src, "--out", tmp_path / "out", "--tile", "64", "--holdout", "0") == 0
    assert sorted(Path(r["source"]).name for r in manifest(tmp_path / "out")) == ["a.png", "b.png"]


# ---------------------------------------------------------------- folders of 8-bit tiles

def test_black_pixels_in_folder_tiles_are_imagery_but_a_scene_border_is_no_data(tmp_path, capsys):
    """--nodata's default: off for a folder's files (stretched tiles hold true black), 0 for a
    single image or band files (the border outside the imaged area)."""
    (tmp_path / "tiles").mkdir()
    for i in range(4):
        pixels = noise(64, 64, seed=i)
        pixels[10, 10] = 0  # one shadow pixel
        Image.fromarray(pixels).save(tmp_path / "tiles" / f"{i}.png")
    assert run(tmp_path / "tiles", "--holdout", 0, "--out", tmp_path / "out") == 0
    assert len(manifest(tmp_path / "out")) == 4
    scene = noise(64, 128)
    scene[:, 64:] = 0  # a black border
    save_scene(tmp_path, "scene.png", scene)
    assert run(tmp_path / "scene.png", "--holdout", 0, "--out", tmp_path / "out2") == 0
    assert len(manifest(tmp_path / "out2")) == 1
    assert run(tmp_path / "tiles", "--holdout", 0, "--nodata", "0", "--out", tmp_path / "out3") == 2
    assert "--nodata" in error_text(capsys.readouterr().err)  # explicit 0 applies


def test_many_tiles_dropped_for_no_data_suggests_nodata_none(tmp_path, capsys):
    scene = noise(64, 256)
    scene[:, 0] = 0                     # a black collar column ...
    scene[5, :150] = 0                  # ... and a black line joined to it: three tiles
    save_scene(tmp_path, "scene.png", scene)
    assert run(tmp_path / "scene.png", "--holdout", 0, "--out", tmp_path / "out") == 0
    assert len(manifest(tmp_path / "out")) == 1
    assert "--nodata none" in capsys.readouterr().out


def test_folder_holdout_rounds_half_up_and_an_empty_holdout_is_a_warning(tmp_path, capsys):
    (tmp_path / "tiles").mkdir()
    for i in range(5):
        Image.fromarray(noise(64, 64, seed=i)).save(tmp_path / "tiles" / f"{i}.png")
    assert run(tmp_path / "tiles", "--out", tmp_path / "out") == 0  # --holdout 0.1 of 5 files
    assert sum(row["split"] == "holdout" for row in manifest(tmp_path / "out")) == 1
    assert "warning" not in capsys.readouterr().out
    assert run(tmp_path / "tiles", "--holdout", 0.05, "--out", tmp_path / "out2") == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--holdout 0.05" in warnings[0]


def test_every_format_the_loader_reads_is_tiled_from_a_folder(tmp_path):
    (tmp_path / "tiles").mkdir()
    for suffix in ("png", "bmp", "webp", "gif"):
        Image.fromarray(noise(64, 64)).save(tmp_path / "tiles" / f"a.{suffix}",
                                            **({"lossless": True} if suffix == "webp" else {}))
    assert run(tmp_path / "tiles", "--holdout", 0, "--out", tmp_path / "out") == 0
    assert sorted(Path(r["source"]).suffix for r in manifest(tmp_path / "out")) == \
        [".bmp", ".gif", ".png", ".webp"]


def test_a_run_folder_in_a_source_is_refused(tiles, capsys):
    run_dir = tiles / "runs" / "smoke-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    Image.fromarray(noise(64, 64)).save(run_dir / "losses.png")
    assert run(tiles, "--holdout", 0, "--out", tiles.parent / "out") == 2
    message = error_text(capsys.readouterr().err)
    assert "train.py" in message and str(run_dir) in message
    assert not (tiles.parent / "out").exists()


def test_tilde_in_sources_and_out_is_the_home_folder(tiles, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run("~/tiles", "--holdout", 0, "--out", "~/mytiles") == 0
    assert len(manifest(tmp_path / "mytiles")) == 3


# ---------------------------------------------------------------- imagery as the field delivers it

def test_4_band_aerial_geotiff_takes_bands_1_2_3_and_ignores_the_infrared(tmp_path, capsys):
    rgb = noise(128, 192).transpose(2, 0, 1)
    nir = np.full((128, 192), 90, np.uint8)
    nir[:, 64:] = 0                         # water or shadow: no infrared; no no-data either
    # As surveys write it: RGB photometry, the fourth band an unspecified extra sample
    # (GDAL's own default for four 8-bit bands would declare it alpha).
    path = write_raster(tmp_path / "rgbn.tif", np.concatenate([rgb, nir[None]]),
                        compress="lzw", photometric="RGB")

    assert run(path, "--holdout", 0, "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    assert len(rows) == 2 * 3                              # every tile kept
    assert "4 (undefined" in capsys.readouterr().err       # the note names the ignored band
    row = next(r for r in rows if (r["x"], r["y"]) == ("128", "64"))
    assert np.array_equal(tile_pixels(tmp_path / "out", row),
                          rgb[:, 64:128, 128:192].transpose(1, 2, 0))
    # Georeferenced: the tile's bounds in the file's CRS, its centre in lon/lat.
    assert row["crs"] == UTM_21S
    assert [float(row[k]) for k in ("left", "bottom", "right", "top")] == [
        500_000 + 128 * 30, 7_000_000 - 128 * 30, 500_000 + 192 * 30, 7_000_000 - 64 * 30]
    assert abs(float(row["lon"]) - -57.0) < 0.1 and abs(float(row["lat"]) - -27.1) < 0.1

    assert run(path, "--bands", "4,3,2", "--holdout", 0, "--out", tmp_path / "nir") == 0
    tile = tile_pixels(tmp_path / "nir", manifest(tmp_path / "nir")[0])
    assert (tile[..., 0] == 90).all() and np.array_equal(tile[..., 1], rgb[2, :64, :64])


def test_fewer_bands_than_asked_names_the_file_and_its_band_count(tmp_path, capsys):
    path = write_raster(tmp_path / "rgbn.tif", noise(64, 64, seed=1).transpose(2, 0, 1))
    assert run(path, "--bands", "1,2,5", "--out", tmp_path / "out") == 2
    message = error_text(capsys.readouterr().err)
    assert "rgbn.tif" in message and "3 bands" in message and "--bands" in message
    assert not (tmp_path / "out").exists()


def test_3_band_uint16_with_declared_nodata_is_stretched_and_its_nodata_dropped(tmp_path,
                                                                                capsys):
    rng = np.random.default_rng(7)
    bands = rng.integers(1000, 5000, (3, 128, 128)).astype(np.uint16)
    bands[:, 70, 70] = 65535                # the declared nodata, inside: its tile is dropped
    bands[:, 0, 0] = 0                      # black, but not declared: imagery
    path = write_raster(tmp_path / "dn16.tif", bands, nodata=65535)

    assert run(path, "--holdout", 0, "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    assert sorted((int(r["x"]), int(r["y"])) for r in rows) == [(0, 0), (0, 64), (64, 0)]
    assert "65535" in nodata_rules(capsys.readouterr().out)
    valid = bands[0][bands[0] != 65535]
    low, high = np.percentile(valid, [2, 98])
    tile = tile_pixels(tmp_path / "out", next(r for r in rows if r["x"] == r["y"] == "0"))
    expected = np.clip((bands[0, :64, :64].astype(float) - low) * 255 / (high - low), 0, 255)
    assert np.abs(tile[..., 0] - expected).max() <= 1


def test_float32_reflectance_with_nan_collar_is_stretched(tmp_path):
    rng = np.random.default_rng(8)
    bands = rng.uniform(0.02, 0.4, (3, 128, 192)).astype(np.float32)
    bands[:, :, :20] = np.nan               # outside the swath
    path = write_raster(tmp_path / "sr.tif", bands, compress="deflate", predictor=3)

    assert run(path, "--holdout", 0, "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    assert sorted({int(r["x"]) for r in rows}) == [64, 128]
    tiles = np.stack([tile_pixels(tmp_path / "out", r) for r in rows])
    assert tiles.min() == 0 and tiles.max() == 255        # stretched, not clipped to black


def test_jpeg_cog_mosaic_keeps_its_black_shadows(tmp_path, capsys):
    """An 8-bit aerial mosaic declares no no-data and has no collar: its pure black
    shadows are imagery, so every tile stays."""
    rgb = noise(256, 256, seed=9)
    for y, x in ((16, 16), (80, 144), (136, 72), (200, 200)):
        rgb[y:y + 16, x:x + 16] = 0         # a shadow in four of the tiles
    path = write_raster(tmp_path / "mosaic.tif", rgb.transpose(2, 0, 1), driver="COG",
                        compress="jpeg", quality=95, georeferenced=False)

    assert run(path, "--holdout", 0, "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    assert len(rows) == 16 and dropped(capsys.readouterr().out, "no-data") == 0
    tile = tile_pixels(tmp_path / "out", next(r for r in rows if r["x"] == r["y"] == "0"))
    with rasterio.open(path) as ds:         # the pixels as GDAL decodes them
        decoded = ds.read(window=((0, 64), (0, 64))).transpose(1, 2, 0)
    assert np.array_equal(tile, decoded) and tile[20:28, 20:28].max() <= 8


@pytest.mark.parametrize("driver", ["GTiff", "JP2OpenJPEG"])
def test_single_band_16_bit_files_form_a_scene(tmp_path, driver):
    """Landsat GeoTIFF bands and Sentinel-2 JPEG2000 bands: red, green, blue in a row."""
    rng = np.random.default_rng(10)
    bands = rng.integers(6000, 9000, (3, 64, 128))
    bands[:, :, :10] = 0                    # the undeclared collar: the left tile goes
    profile = {"quality": 100, "reversible": True} if driver == "JP2OpenJPEG" else {}
    suffix = "jp2" if driver == "JP2OpenJPEG" else "tif"
    paths = [save_band(tmp_path / f"T21_B0{n}.{suffix}", band, driver=driver, **profile)
             for n, band in zip((4, 3, 2), bands)]

    assert run(*paths, "--holdout", 0, "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    assert [(r["x"], r["source"]) for r in rows] == [
        ("64", f"T21_B04.{suffix}+T21_B03.{suffix}+T21_B02.{suffix}")]
    tile = tile_pixels(tmp_path / "out", rows[0])
    low, high = np.percentile(bands[2][:, 10:], [2, 98])
    expected = np.clip((bands[2, :, 64:] - low) * 255 / (high - low), 0, 255)
    assert np.abs(tile[..., 2] - expected).max() <= 1


def test_black_collar_is_no_data_but_black_inside_is_not():
    black = np.zeros((6, 8), bool)
    black[:, :2] = True                     # collar on the left
    black[2, 2:5] = True                    # a bay of it reaching in
    black[4, 5] = True                      # a shadow inside
    collar = prepare.edge_connected(black)
    assert collar[:, :2].all() and collar[2, 2:5].all()
    assert not collar[4, 5] and collar.sum() == 12 + 3


def test_max_nodata_keeps_tiles_up_to_that_share(tmp_path):
    rgb = noise(64, 128).transpose(2, 0, 1)
    path = write_raster(tmp_path / "a.tif", rgb, nodata=0)
    with rasterio.open(path, "r+") as ds:
        ds.write(np.zeros((3, 16, 64), np.uint8), window=((0, 16), (0, 64)))  # a quarter of
    #                                                                          the left tile
    assert run(path, "--holdout", 0, "--out", tmp_path / "drop") == 0
    assert [r["x"] for r in manifest(tmp_path / "drop")] == ["64"]
    assert run(path, "--holdout", 0, "--max-nodata", 0.25, "--out", tmp_path / "keep") == 0
    assert [r["x"] for r in manifest(tmp_path / "keep")] == ["0", "64"]


def test_stretch_can_be_forced_or_turned_off(tmp_path):
    dim = np.random.default_rng(11).integers(20, 60, (3, 64, 64)).astype(np.uint8)
    path = write_raster(tmp_path / "dim.tif", dim)
    assert run(path, "--holdout", 0, "--stretch", "on", "--out", tmp_path / "on") == 0
    tile = tile_pixels(tmp_path / "on", manifest(tmp_path / "on")[0])
    assert tile.min() == 0 and tile.max() == 255
    small = write_raster(tmp_path / "small16.tif", dim.astype(np.uint16))
    assert run(small, "--holdout", 0, "--stretch", "off", "--out", tmp_path / "off") == 0
    tile = tile_pixels(tmp_path / "off", manifest(tmp_path / "off")[0])
    assert np.array_equal(tile, dim.transpose(1, 2, 0))


@pytest.mark.parametrize("compress, kept_columns", [
    ("jpeg", [64, 128, 192]),      # lossy: the collar decodes near 0 and is found
    ("lzw", [0, 64, 128, 192]),    # lossless: dark but not 0, so imagery
])
def test_near_black_collar_of_a_lossy_file_is_no_data(tmp_path, capsys, compress, kept_columns):
    """A JPEG-compressed COG whose collar reads as values just above 0 (as mosaics and
    lossy codecs leave it) loses its collar tiles by default; its black shadow stays."""
    rgb = noise(192, 256, seed=12)
    rgb[:, :24] = 6                         # a near-black collar down the left edge
    rgb[100:116, 150:166] = 0               # a shadow inside the imagery
    path = write_raster(tmp_path / "mosaic.tif", rgb.transpose(2, 0, 1), driver="COG",
                        compress=compress)

    assert run(path, "--holdout", 0, "--out", tmp_path / "out") == 0

    rows = manifest(tmp_path / "out")
    assert sorted({int(r["x"]) for r in rows}) == kept_columns
    assert len(rows) == 3 * len(kept_columns)          # three rows of tiles, shadow tile kept
    rule = nodata_rules(capsys.readouterr().out)
    assert "collar" in rule and ("15" in rule and "JPEG" in rule) == (compress == "jpeg")

    assert run(path, "--holdout", 0, "--near-black", 0, "--out", tmp_path / "exact") == 0
    assert len(manifest(tmp_path / "exact")) == 12     # an exact-0 collar: none there


def test_gdal_default_4_band_file_keeps_its_infrared_out_of_the_mask(tmp_path, capsys):
    """GDAL marks the fourth band of a 4-band 8-bit GeoTIFF alpha unless told otherwise; an
    infrared band there (0 over water) must not become transparency. A real alpha (0 and
    255 only) still marks no data."""
    rgb = noise(128, 128, seed=13).transpose(2, 0, 1)
    nir = np.random.default_rng(13).integers(40, 200, (128, 128)).astype(np.uint8)
    nir[:, :64] = 0                                     # water: no infrared
    path = write_raster(tmp_path / "rgbn.tif", np.concatenate([rgb, nir[None]]))
    with rasterio.open(path) as ds:
        assert ds.colorinterp[3].name == "alpha"        # as GDAL wrote it

    assert run(path, "--holdout", 0, "--out", tmp_path / "out") == 0
    assert len(manifest(tmp_path / "out")) == 4
    rule = nodata_rules(capsys.readouterr().out)
    assert "band 4" in rule and "collar" in rule     # not a mask: the collar rule instead

    alpha = np.where(nir > 0, 255, 0).astype(np.uint8)  # a real mask: the left half no data
    path = write_raster(tmp_path / "rgba.tif", np.concatenate([rgb, alpha[None]]))
    assert run(path, "--holdout", 0, "--out", tmp_path / "masked") == 0
    assert [r["x"] for r in manifest(tmp_path / "masked")] == ["64", "64"]
    rule = nodata_rules(capsys.readouterr().out)
    assert "alpha" in rule and "band 4" not in rule and "collar" not in rule


# ---------------------------------------------------------------- end to end

def test_a_4_band_geotiff_is_prepared_and_trained_on(tmp_path):
    """A user's RGBN aerial GeoTIFF, as GDAL writes it by default (fourth band 'alpha'):
    prepare.py -> tiles and a georeferenced manifest -> train.py starts training on them."""
    rng = np.random.default_rng(14)
    rgbn = rng.integers(30, 226, (4, 256, 256)).astype(np.uint8)
    rgbn[3, :, :100] = 0                    # no infrared over water
    path = write_raster(tmp_path / "rgbn.tif", rgbn, compress="lzw")
    tiles = tmp_path / "tiles"

    assert run(path, "--holdout", 0.25, "--block", 128, "--out", tiles) == 0

    rows = manifest(tiles)
    assert len(rows) == 16 and {r["split"] for r in rows} == {"train", "holdout"}
    assert all(r["crs"] == UTM_21S and r["lon"] and r["lat"] and r["left"] for r in rows)
    run_dir = tmp_path / "run"
    proc = run_repo_script("train.py", "--config", "configs/smoke.json", "--set",
                           f"data.path={tiles}", "--set", "train.steps=2", "--out", run_dir,
                           timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [line for line in (run_dir / "log.jsonl").read_text().splitlines()
               if '"event"' not in line]
    assert len(records) == 2
    assert any(name.startswith("model-2") for name in os.listdir(run_dir / "checkpoints"))
