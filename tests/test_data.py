"""Loading tiles: every file checked at start-up, problems named, pixels exact (Lessons 4, 7, 13)."""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import data
from conftest import ROOT, run_script, write_tiles


def raised(call, *args, **kwargs):
    """The message of the DataError that call(*args, **kwargs) raises."""
    with pytest.raises(data.DataError) as err:
        call(*args, **kwargs)
    return str(err.value)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def problem_lines(message):
    """{file: its line} of a DataError's listing, one line per unusable file."""
    return {line.strip().split(": ", 1)[0]: line for line in message.splitlines()[1:]}


def save(folder, name, array, mode=None):
    path = os.path.join(folder, name)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def rgb(seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_reads_a_folder_recursively_ignoring_other_files(tmp_path):
    write_tiles(str(tmp_path / "a"), 3)
    write_tiles(str(tmp_path / "a" / "deeper"), 2, seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "aux.xml").write_text("<x/>")
    tiles, files = data.load_tiles(str(tmp_path / "a"))
    assert tiles.shape == (5, 64, 64, 3) and tiles.dtype == np.uint8
    assert len(files) == 5


def test_pixels_are_kept_exactly_as_uint8(tmp_path):
    """Lesson 12: no scaling happens while loading; the graph scales once."""
    img = rgb(3)
    save(str(tmp_path), "t.png", img)
    tiles, _ = data.load_tiles(str(tmp_path))
    np.testing.assert_array_equal(tiles[0], img)


def test_every_problem_is_reported_at_once_by_file_name(tmp_path):
    folder = str(tmp_path)
    save(folder, "good.png", rgb())
    gray = save(folder, "gray.png", rgb()[:, :, 0])
    alpha = np.dstack([rgb(), np.full((64, 64), 100, np.uint8)])
    transparent = save(folder, "transparent.png", alpha)
    small = save(folder, "small.png", rgb(size=32))
    broken = os.path.join(folder, "broken.png")
    with open(os.path.join(folder, "good.png"), "rb") as f:
        open(broken, "wb").write(f.read()[:300])  # truncated mid-stream
    message = raised(data.load_tiles, folder)
    lines = problem_lines(message)
    assert set(lines) == {gray, transparent, small, broken}
    assert "data.grayscale" in lines[gray] and "data.bad_files" in message.splitlines()[0]
    assert "alpha" in lines[transparent] and "32x32" in lines[small]


def test_an_exif_orientation_is_applied_as_a_viewer_would(tmp_path):
    stored = rgb(3, size=16)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    tiles, _ = data.load_tiles(str(tmp_path), image_size=16)
    np.testing.assert_array_equal(tiles[0], np.rot90(stored, k=-1))


def test_gif_tiles_are_read_like_any_palette_image(tmp_path):
    """A downloader's GIF tiles were passed over: 'no image files found'."""
    Image.fromarray(rgb(4, size=16)).convert("P").save(tmp_path / "t.GIF")
    tiles, files = data.load_tiles(str(tmp_path), image_size=16)
    assert files == [str(tmp_path / "t.GIF")] and tiles.shape == (1, 16, 16, 3)


def test_grayscale_can_be_converted_on_request(tmp_path):
    folder = str(tmp_path)
    save(folder, "gray.png", rgb()[:, :, 0])
    tiles, _ = data.load_tiles(folder, grayscale="convert")
    assert tiles.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(tiles[0, :, :, 0], tiles[0, :, :, 2])


def test_grayscale_saved_as_rgb_is_caught_too(tmp_path):
    """Lesson 7: three equal channels is a grayscale tile in disguise."""
    gray = rgb()[:, :, :1].repeat(3, axis=2)
    path = save(str(tmp_path), "fake_colour.png", gray)
    assert "data.grayscale" in problem_lines(raised(data.load_tiles, str(tmp_path)))[path]
    assert data.load_tiles(str(tmp_path), grayscale="convert")[0].shape == (1, 64, 64, 3)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(64, 0).repeat(16, 1)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    tiles, _ = data.load_tiles(str(tmp_path), grayscale="convert")
    assert list(tiles[0, 0, ::16, 0]) == [0, 1, 128, 255]


def write_png16_rgb(path, rgb16):
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_sixteen_bit_rgb_is_scaled_not_clipped(tmp_path):
    levels = np.array([0, 257, 32896, 65535], np.uint16).repeat(16)  # 64 columns
    rgb16 = np.stack([levels, levels[::-1], np.full(64, 32896, np.uint16)], -1)[None].repeat(64, 0)
    write_png16_rgb(tmp_path / "rgb16.png", rgb16)
    tiles, _ = data.load_tiles(str(tmp_path))
    assert list(tiles[0, 0, ::16, 0]) == [0, 1, 128, 255]
    assert list(tiles[0, 0, ::16, 1]) == [255, 128, 1, 0]
    assert np.all(tiles[0, :, :, 2] == 128)


def test_opaque_rgba_and_palette_become_rgb(tmp_path):
    folder = str(tmp_path)
    img = rgb()
    save(folder, "opaque.png", np.dstack([img, np.full((64, 64), 255, np.uint8)]))
    Image.fromarray(img).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    tiles, files = data.load_tiles(folder)
    by_name = dict(zip(map(os.path.basename, files), tiles))
    np.testing.assert_array_equal(by_name["opaque.png"], img)
    assert by_name["palette.png"].shape == (64, 64, 3)


def test_larger_images_are_area_averaged(tmp_path):
    small = rgb(5, size=64)
    big = small.repeat(2, axis=0).repeat(2, axis=1)  # each pixel a 2x2 block
    save(str(tmp_path), "big.png", big)
    tiles, _ = data.load_tiles(str(tmp_path))
    np.testing.assert_array_equal(tiles[0], small)


def test_unreadable_files_can_be_skipped_with_a_report(tmp_path):
    folder = str(tmp_path)
    write_tiles(folder, 3)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    said = []
    tiles, files = data.load_tiles(folder, bad_files="skip", log=said.append)
    assert len(tiles) == len(files) == 3
    assert "skipped 2" in said[0] and "zero.png" in said[0] and "junk.jpg" in said[0]


def test_unreadable_files_get_the_bad_files_hint_only_when_there_are_some(tmp_path):
    folder = str(tmp_path)
    write_tiles(folder, 2)
    save(folder, "gray.png", rgb()[:, :, 0])
    with pytest.raises(data.DataError) as err:
        data.load_tiles(folder)
    assert "bad_files" not in str(err.value)  # grayscale alone: skipping would not help
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(data.DataError) as err:
        data.load_tiles(folder)
    first_line = str(err.value).splitlines()[0]
    assert "2 of 4 files" in first_line and "1 cannot be read" in first_line
    assert "data.bad_files=skip" in first_line  # what to do, not just what went wrong


def test_messages_speak_to_the_script_that_was_run(tmp_path):
    """train.py's data come from data.* keys; generate/evaluate take them from an option."""
    folder = str(tmp_path / "gray")
    os.makedirs(folder)
    save(folder, "gray.png", rgb()[:, :, 0])
    save(folder, "gray_as_rgb.png", rgb()[:, :, :1].repeat(3, axis=2))
    save(folder, "small.png", rgb(size=32))
    (tmp_path / "gray" / "zero.png").write_bytes(b"")
    message = raised(data.load_tiles, folder)
    for key in ("data.grayscale=convert", "data.bad_files=skip", "model.image_size"):
        assert key in message
    assert "data.path" in raised(data.load_tiles, str(tmp_path / "nope"))

    real = data.option_advice("--real")
    message = raised(data.load_tiles, folder, advice=real)
    assert "data." not in message and "model." not in message
    lines = problem_lines(message)     # the unreadable file's remedy is on the first line
    assert all("--real" in lines[os.path.join(folder, name)] for name in
               ("gray.png", "gray_as_rgb.png", "small.png"))
    assert "--real" in message.splitlines()[0]
    message = raised(data.load_tiles, str(tmp_path / "nope"), advice=real)
    assert str(tmp_path / "nope") in message and "--real" in message
    assert "data.path" not in message


def test_symlinked_folders_are_followed_once_even_in_a_loop(tmp_path):
    write_tiles(str(tmp_path / "elsewhere"), 2)
    write_tiles(str(tmp_path / "data" / "own"), 1, seed=1)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "data" / "own" / "loop")  # back up: a loop
    os.symlink(tmp_path / "data" / "own", tmp_path / "data" / "same")  # a folder read already
    files = data.find_images(str(tmp_path / "data"))
    assert len(files) == 3
    assert sorted(os.path.realpath(f) for f in files) == sorted(
        [str(tmp_path / "elsewhere" / "tile-0000.png"), str(tmp_path / "elsewhere" / "tile-0001.png"),
         str(tmp_path / "data" / "own" / "tile-0000.png")])


def test_hidden_files_and_folders_are_left_out(tmp_path):
    write_tiles(str(tmp_path), 1)
    write_tiles(str(tmp_path / ".thumbs"), 2)
    write_tiles(str(tmp_path / "sub" / ".cache"), 2)
    save(str(tmp_path), ".hidden.png", rgb())
    assert data.find_images(str(tmp_path)) == [str(tmp_path / "tile-0000.png")]


def test_32_bit_integer_gray_is_scaled_by_its_range_not_clipped(tmp_path):
    values = np.array([[0, 100000, 200000, 300000]], np.int32).repeat(64, 0).repeat(16, 1)
    Image.fromarray(values).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    tiles, _ = data.load_tiles(str(tmp_path), grayscale="convert")
    assert list(tiles[0, 0, ::16, 0]) == [0, 85, 170, 255]
    below = np.array([[-1000, 0, 65535, 65535]], np.int32).repeat(64, 0).repeat(16, 1)
    Image.fromarray(below).save(tmp_path / "i32.tif")  # negative values are not clipped either
    tiles, _ = data.load_tiles(str(tmp_path), grayscale="convert")
    assert list(tiles[0, 0, ::16, 0]) == [0, 4, 255, 255]


def test_non_square_images_keep_their_centred_square(tmp_path):
    """A 16x100 image keeps its middle 16x16; the rest of it is not used."""
    wide = rgb(4, size=100)[:16]  # 16 rows, 100 columns
    save(str(tmp_path), "wide.png", wide)
    tiles, _ = data.load_tiles(str(tmp_path), image_size=16)
    np.testing.assert_array_equal(tiles[0], wide[:, 42:58])


def test_empty_folder_missing_path_and_too_few_tiles(tmp_path):
    assert str(tmp_path) in raised(data.load_tiles, str(tmp_path))
    assert str(tmp_path / "nope") in raised(data.load_tiles, str(tmp_path / "nope"))
    write_tiles(str(tmp_path), 3)
    message = raised(data.load_tiles, str(tmp_path), min_count=8)
    assert str(tmp_path) in message and "3" in message and "train.batch_size" in message


def test_manifest_splits_are_kept_apart():
    train = data.find_images(os.path.join(ROOT, "data"), "train")
    holdout = data.find_images(os.path.join(ROOT, "data"), "holdout")
    assert len(train) > 1000 and len(holdout) > 100
    assert not set(train) & set(holdout)
    message = raised(data.find_images, os.path.join(ROOT, "data"), "valid")
    assert "'valid'" in message and "'holdout'" in message  # the splits it has


def write_manifest(folder, text, encoding="utf-8"):
    for i in range(2):
        save(str(folder), f"t{i}.png", rgb(i))
    with open(folder / "manifest.csv", "w", encoding=encoding, newline="") as f:
        f.write(text)
    return str(folder)


def test_manifests_as_spreadsheets_save_them_are_read(tmp_path):
    # A byte-order mark, spaces around names and values, Windows line ends.
    folder = write_manifest(tmp_path, "\ufefffile , split\r\n t0.png , train\r\nt1.png,holdout \r\n")
    assert data.find_images(folder, "train") == [str(tmp_path / "t0.png")]
    assert data.manifest_splits(folder) == {"train", "holdout"}


def test_unreadable_manifests_and_unnamed_rows_are_named(tmp_path):
    (tmp_path / "latin").mkdir()
    latin = write_manifest(tmp_path / "latin", "file,split\nt0.png,tr\u00e4in\n", "latin-1")
    message = raised(data.find_images, latin, "train")
    assert os.path.join(latin, "manifest.csv") in message and "UTF-8" in message
    (tmp_path / "gap").mkdir()
    gap = write_manifest(tmp_path / "gap", "file,split\nt0.png,train\n,train\nt1.png,train\n")
    message = raised(data.find_images, gap, "train")
    assert os.path.join(gap, "manifest.csv") in message and "line 3" in message
    (tmp_path / "nosplit").mkdir()
    nosplit = write_manifest(tmp_path / "nosplit", "file\nt0.png\nt1.png\n")
    message = raised(data.find_images, nosplit, "train")
    assert os.path.join(nosplit, "manifest.csv") in message and "'split'" in message
    assert len(data.find_images(nosplit, "")) == 2


def test_a_run_folder_is_not_read_as_tiles(tmp_path):
    """Its samples/ are grids of fakes; evaluate.py --fake RUN judged those grids as fakes."""
    run = tmp_path / "tiles" / "runs" / "cpu-1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples").mkdir()
    (run / "config.json").write_text("{}")
    save(str(run / "samples"), "step-000010.png", rgb())
    save(str(tmp_path / "tiles"), "t0.png", rgb())
    message = raised(data.find_images, str(tmp_path / "tiles"))
    assert str(run) in message and "data.path" in message
    message = raised(data.find_images, str(run), advice=data.option_advice("--fake"))
    assert "--fake" in message and "--checkpoint" in message


def test_batches_cover_each_epoch_and_depend_only_on_seed_and_step():
    seen = np.concatenate([data.batch_indices(s, 8, 20, seed=3) for s in range(5)])  # 2 epochs
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:40]) == list(range(20))
    np.testing.assert_array_equal(data.batch_indices(4, 8, 20, 3), data.batch_indices(4, 8, 20, 3))
    assert not np.array_equal(data.batch_indices(0, 8, 20, 3), data.batch_indices(0, 8, 20, 4))


def test_disk_batches_equal_memory_batches(tmp_path):
    """Lesson 4: data.in_memory=false reads ahead in a thread and gives the same pixels."""
    folder = write_tiles(str(tmp_path), 10)
    tiles, files = data.load_tiles(folder)
    in_memory = data.Batches(tiles, files, 4, 64, seed=1)
    from_disk = data.Batches(None, files, 4, 64, seed=1)
    try:
        for step in (0, 1, 2, 5, 6):
            np.testing.assert_array_equal(in_memory.get(step), from_disk.get(step))
    finally:
        from_disk.close()


def test_augmentation_is_the_dihedral_group():
    img = rgb(9, size=8)[None].repeat(400, axis=0)
    out = data.augment(img, np.random.default_rng(0))
    variants = {o.tobytes() for o in out}
    assert len(variants) == 8  # 4 turns x optional flip, all reached
    base = img[0]
    group = [np.rot90(base, k) for k in range(4)] + [np.rot90(base, k)[:, ::-1] for k in range(4)]
    assert variants == {g.tobytes() for g in group}


def test_random_crops_are_full_resolution_windows_of_each_tile():
    """data.load_size: each image becomes one random window of its own pixels, seeded."""
    tiles = np.random.default_rng(0).integers(0, 256, (50, 12, 12, 3), dtype=np.uint8)
    crops = data.random_crops(tiles, 5, np.random.default_rng(1))
    assert crops.shape == (50, 5, 5, 3)
    offsets = set()
    for tile, crop in zip(tiles, crops):
        found = [(r, c) for r in range(8) for c in range(8)
                 if np.array_equal(tile[r:r + 5, c:c + 5], crop)]
        assert found  # a window of this tile, not resized, not of another tile
        offsets.add(found[0])
    assert len(offsets) > 20 and {r for r, _ in offsets} >= {0, 7}  # every row offset reachable
    np.testing.assert_array_equal(crops, data.random_crops(tiles, 5, np.random.default_rng(1)))
    assert data.random_crops(tiles, 12, np.random.default_rng(1)) is tiles  # same size: untouched


def test_train_refuses_bad_tiles_before_writing_anything(tmp_path):
    folder = write_tiles(str(tmp_path / "tiles"), 12)
    save(folder, "gray.png", rgb()[:, :, 0])
    out = tmp_path / "run"
    proc = run_script("train.py", "--config", "configs/smoke.json", "--set", f"data.path={folder}",
                      "--out", out)
    assert proc.returncode == 2
    assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr
    assert "gray.png" in proc.stderr and "data.grayscale" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("n, shape", [(64, (8, 8)), (32, (4, 8)), (36, (6, 6)), (12, (3, 4)),
                                      (31, (6, 6))])
def test_sample_grids_have_no_ragged_row_when_a_divisor_allows(n, shape):
    tiles = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    grid = data.image_grid(tiles, gap=1)
    rows, cols = shape
    assert grid.shape == (rows * 3 - 1, cols * 3 - 1, 3)
    assert grid[0, 3 * (cols - 1)].tolist() == [cols - 1] * 3  # row-major: tile cols-1 ends row 0
    assert grid[3, 0].tolist() == [cols] * 3


def write_raster(path, bands, georeferenced=False, **profile):
    """A GeoTIFF of (C, H, W) `bands` as GDAL writes it by default."""
    import rasterio
    from rasterio.transform import from_origin
    where = {"crs": "EPSG:32618", "transform": from_origin(500_000, 4_000_000, 5, 5)} \
        if georeferenced else {}
    with rasterio.open(path, "w", driver="GTiff", count=len(bands), width=bands.shape[2],
                       height=bands.shape[1], dtype=bands.dtype.name, **where, **profile) as ds:
        ds.write(bands)
    return str(path)


def test_a_folder_of_scene_rasters_is_sent_to_prepare_py(tmp_path):
    """Downloaded data sets are often multi-band or non-8-bit GeoTIFFs: PIL would take a
    near-infrared band for transparency (GDAL marks a 4-band 8-bit file's fourth band alpha
    by default), 16-bit colour for its high bytes, a 16-bit band for a grayscale tile."""
    folder = tmp_path / "download"
    folder.mkdir()
    save(str(folder), "ok.png", rgb())
    nir_as_alpha = np.full((4, 64, 64), 255, np.uint8)  # opaque: PIL would read RGB silently
    scenes = [write_raster(folder / "rgbn.tif", np.zeros((4, 64, 64), np.uint8),
                           photometric="RGB"),
              write_raster(folder / "gdal_default.tif", nir_as_alpha),
              write_raster(folder / "reflectance.tif", np.zeros((3, 64, 64), np.float32),
                           photometric="RGB")]
    band = write_raster(folder / "B4.tif", np.ones((1, 64, 64), np.uint16), georeferenced=True)
    lines = problem_lines(raised(data.load_tiles, str(folder)))
    assert set(lines) == {*scenes, band}
    assert all("prepare.py" in line for line in lines.values())
    assert "RED.TIF GREEN.TIF BLUE.TIF" in lines[band]     # a band: three files make a scene


def test_a_gray_16_bit_tiff_without_georeference_stays_a_grayscale_tile(tmp_path):
    write_raster(tmp_path / "g16.tif", np.full((1, 64, 64), 65535, np.uint16))
    tiles, _ = data.load_tiles(str(tmp_path), grayscale="convert")
    assert (tiles == 255).all()


def test_train_sends_a_gdal_default_4_band_geotiff_to_prepare_py(tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    bands = np.random.default_rng(0).integers(0, 256, (4, 64, 64)).astype(np.uint8)
    path = write_raster(folder / "rgbn.tif", bands, georeferenced=True)
    out = tmp_path / "run"
    proc = run_script("train.py", "--config", "configs/smoke.json", "--set",
                      f"data.path={folder}", "--out", out)
    assert proc.returncode == 2
    assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr
    assert path in proc.stderr and "prepare.py" in proc.stderr
    assert "transparent" not in proc.stderr     # the infrared is not taken for an alpha
    assert not out.exists()
