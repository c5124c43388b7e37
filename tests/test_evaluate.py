"""evaluate.py as a user runs it: on a checkpoint, on a folder of fakes, and when given bad input."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import config as config_lib
import data
import evaluate
from conftest import ROOT, assert_clear_error, assert_named, assert_said, run_script, write_tiles

SAMPLE = os.path.join(ROOT, "data")


def test_checkpoint_against_holdout_writes_every_number(smoke_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_script("evaluate.py", "--real", "data:holdout", "--checkpoint", smoke_run,
                      "-n", 64, "--seed", 3, "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["n"] == 64 and r["seed"] == 3 and r["checkpoint_step"] == 40
    assert r["image_size"] == 16  # the smoke model's size; reals were area-averaged to it
    assert_said(r["notes"], "real", "64 of 64", "16x16")
    assert set(r["swd_x1e3"]) == set(r["swd_real_baseline_x1e3"]) == {"16", "avg"}
    assert r["swd_set_size"] == 32  # fakes and baseline both compare halves of 32
    # The training set comes from the run's config; its manifest's holdout split is found.
    sample = os.path.join(ROOT, "data")  # config.json stores data.path absolute
    assert r["train"] == f"{sample} (split train)" and r["holdout"] == f"{sample} (split holdout)"
    for key in ("ms_ssim_fake", "ms_ssim_real", "nn_fake_to_train", "nn_holdout_to_train",
                "nn_fake_closer_than_holdout", "c2st_acc"):
        assert isinstance(r[key], float), key
    assert len(r["color_stats"]["w1"]) == 3
    assert {"generate", "swd", "ms_ssim", "nn", "c2st", "total"} <= set(r["timings"])
    assert "SWD x1e3" in proc.stdout and "baseline" in proc.stdout


def test_copies_of_training_tiles_are_reported_as_memorised(tmp_path, capsys):
    # 16x16 like the smoke model, for speed: evaluate.py shrinks the 64x64 training tiles the same way.
    tiles, _ = data.load_tiles(SAMPLE, "train", 16, log=lambda *a: None)
    rng = np.random.default_rng(0)
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for i, tile in enumerate(data.augment(tiles[rng.choice(len(tiles), 40, replace=False)], rng)):
        Image.fromarray(tile).save(fakes / f"fake-{i:03d}.png")  # turned and flipped copies
    out = tmp_path / "eval.json"
    assert evaluate.cli(["--real", f"{SAMPLE}:holdout", "--fake", str(fakes), "--train", SAMPLE,
                         "-n", "40", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 40 and "checkpoint_step" not in r
    assert r["nn_fake_to_train"] == 0.0 and r["nn_holdout_to_train"] > 1.0
    assert r["nn_fake_closer_than_holdout"] > 0.99
    assert "NN L2 to train" in capsys.readouterr().out


def test_fewer_reals_than_n_uses_them_all_and_says_so(tmp_path, capsys):
    reals = tmp_path / "reals"
    fakes = tmp_path / "fakes"
    for folder, seed in ((reals, 0), (fakes, 1)):
        folder.mkdir()
        rng = np.random.default_rng(seed)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "eval.json"
    assert evaluate.cli(["--real", str(reals), "--fake", str(fakes), "-n", "20",
                         "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 12 and r["n_requested"] == 20
    assert_said(r["notes"], "real", "12 images", "-n 20")
    assert_said(r["notes"], "--train")  # how to get the nearest-neighbour check
    assert "nn_fake_to_train" not in r


@pytest.mark.parametrize("args, names", [
    (["--real", "no/such/folder", "--fake", SAMPLE], ["--real", "no/such/folder"]),
    (["--real", SAMPLE, "--checkpoint", ROOT + "/configs"], [ROOT + "/configs", "checkpoint"]),
    (["--real", SAMPLE + "/holdout:train", "--fake", SAMPLE],
     ["--real", SAMPLE + "/holdout", ":train", "manifest.csv"]),
    (["--real", SAMPLE + ":nosuchsplit", "--fake", SAMPLE],  # and the splits it has
     [os.path.join(SAMPLE, "manifest.csv"), "nosuchsplit", "holdout", "train"]),
])
def test_user_errors_are_one_line_and_exit_2(args, names, capsys, tmp_path):
    out = tmp_path / "eval.json"
    assert_clear_error(evaluate.cli([*args, "--json", str(out)]), capsys.readouterr().err, *names,
                       nothing_written=out)


def test_fakes_too_small_for_the_metrics_are_one_error_line(tmp_path, capsys):
    tiny = write_tiles(str(tmp_path / "tiny"), 6, size=4)
    code = evaluate.cli(["--real", SAMPLE, "--fake", tiny, "-n", "6"])
    # the folder, the size of its images, then the least the metrics take
    assert_clear_error(code, capsys.readouterr().err, "--fake", (tiny, "4", "8x8"))


def test_threads_leave_a_core_free_by_default_and_reach_the_metrics(monkeypatch, tmp_path):
    """Lesson 28 for evaluate.py too; what it is given reaches every TensorFlow session."""
    monkeypatch.setattr(config_lib.os, "cpu_count", lambda: 8)
    assert evaluate.parse_args(["--real", SAMPLE, "--fake", SAMPLE]).threads == 7
    class Reached(Exception):
        pass

    def metrics_called(*args, threads, **kwargs):
        raise Reached(threads)
    monkeypatch.setattr(evaluate.metrics, "evaluate_sets", metrics_called)
    with pytest.raises(Reached) as reached:
        evaluate.main(["--real", SAMPLE, "--fake", write_tiles(str(tmp_path / "f"), 6, size=32),
                       "-n", "6", "--threads", "1"])
    assert reached.value.args == (1,)


def test_json_in_a_folder_it_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate.os, "access", lambda path, mode: path != str(tmp_path))
    code = evaluate.cli(["--real", "no/such/folder", "--fake", SAMPLE,
                         "--json", str(tmp_path / "eval.json")])
    assert_clear_error(code, capsys.readouterr().err, "--json", tmp_path,
                       nothing_written=tmp_path / "eval.json")


def test_paths_from_home_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = evaluate.parse_args(["--real", "~/data:holdout", "--fake", "~/fakes", "--json", "~/e.json"])
    assert (args.real, args.fake, args.json) == (
        f"{tmp_path}/data:holdout", str(tmp_path / "fakes"), str(tmp_path / "e.json"))


def test_json_naming_a_folder_is_refused_before_any_work(tmp_path, capsys):
    # --real does not exist either: the --json error coming first shows nothing was read.
    code = evaluate.cli(["--real", "no/such/folder", "--fake", SAMPLE, "--json", str(tmp_path)])
    assert_clear_error(code, capsys.readouterr().err, "--json", tmp_path)
    assert os.listdir(tmp_path) == []


def test_unusable_reals_say_what_to_do_with_real(smoke_run, tmp_path, capsys):
    """The hint names --real, not train.py's data.* keys that evaluate.py does not have."""
    gray, broken = tmp_path / "gray", tmp_path / "broken"
    gray.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(gray / f"{i}.png")
    write_tiles(str(broken), 4, size=16)
    (broken / "tile-0003.png").write_bytes(b"not a png")
    for real, names in ((gray, ["4 of 4", "0.png"]), (broken, ["1 of 4", "tile-0003.png"])):
        code = evaluate.cli(["--real", str(real), "--checkpoint", smoke_run, "-n", "4"])
        assert_clear_error(code, capsys.readouterr().err, "--real", real, *names,
                           unnamed=["data.grayscale", "data.bad_files"], listing=True)


def test_reals_of_a_load_size_run_are_windows_at_its_resolution(tmp_path):
    """A run trained on windows (data.load_size) is compared with windows, not shrunk tiles."""
    folder = write_tiles(str(tmp_path / "reals"), 6, size=64)
    notes = []
    reals, _ = evaluate.load_set(folder, "real", 16, notes=notes, load_size=32)
    assert reals.shape == (6, 16, 16, 3)
    tiles32, _ = data.load_tiles(folder, image_size=32)
    for tile, window in zip(tiles32, reals):
        assert any(np.array_equal(tile[r:r + 16, c:c + 16], window)
                   for r in range(17) for c in range(17))
    assert_said(notes, "real", "16x16", "32x32", "data.load_size")  # windows of what size
    assert_said(notes, "real", "6 of 6", "32x32")  # area-averaged to the run's load_size
    too_big = 128
    with pytest.raises(evaluate.EvalError) as e:
        evaluate.load_set(folder, "real", 16, load_size=too_big)
    assert_named(str(e.value), "--real", ("64x64", "128x128"))  # theirs, then the run's


def test_set_syntax():
    assert data.parse_set("data:holdout") == ("data", "holdout")
    assert data.parse_set("data/manifest.csv:train") == ("data/manifest.csv", "train")
    assert data.parse_set("data:all") == ("data", "")  # every manifest row
    assert data.parse_set(SAMPLE) == (SAMPLE, None)


@pytest.mark.slow
def test_2048_images_per_set_take_under_two_minutes(tmp_path):
    """The speed promise of --help: -n 2048 at 64x64 on a 2-core CPU (generation aside)."""
    tiles, _ = data.load_tiles(SAMPLE, "", 64, log=lambda *a: None)
    rng = np.random.default_rng(0)
    for name in ("reals", "fakes"):
        folder = tmp_path / name
        folder.mkdir()
        for i, tile in enumerate(data.augment(tiles[rng.integers(0, len(tiles), 2048)], rng)):
            Image.fromarray(tile).save(folder / f"{i:04d}.png")
    out = tmp_path / "eval.json"
    proc = run_script("evaluate.py", "--real", tmp_path / "reals", "--fake", tmp_path / "fakes",
                      "--train", "data", "-n", 2048, "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["n"] == 2048 and r["timings"]["total"] < 120, r["timings"]


def test_fakes_of_mixed_sizes_are_judged_at_the_smallest_whatever_the_order(tmp_path):
    """The set's size does not depend on which file sorts first; what changed is noted."""
    for name, first, second in (("small_first", 16, 24), ("large_first", 24, 16)):
        fakes = tmp_path / name
        write_tiles(str(fakes / "a"), 4, size=first)
        write_tiles(str(fakes / "b"), 4, size=second, seed=1)
        wide = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
        Image.fromarray(wide).save(fakes / "b" / "wide.png")
        notes = []
        tiles, _ = evaluate.load_set(str(fakes), "fake", None, notes=notes)
        assert tiles.shape == (9, 16, 16, 3)
        assert_said(notes, "fake", "5 of 9", "16x16")  # shrunk to the smallest
        assert_said(notes, "fake", "1 of 9", "square")  # cut to a square
