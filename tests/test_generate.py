"""generate.py: samples, the Turing quiz, interpolation, the SavedModel export, errors.

Each mode runs once end to end as a user would (a subprocess on the smoke
run's checkpoint); the pure helpers and the error paths run in-process
through `generate.cli`, which spares a TensorFlow import (~5 s) per test.
"""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_clear_error, run_script, write_tiles

import data
import sampling
import generate

SEED = 7
SIZE = 16  # configs/smoke.json model.image_size


@pytest.fixture(scope="module")
def gen(smoke_run):
    g = sampling.Generator(os.path.join(smoke_run, "checkpoints", "model-40"), batch_size=64,
                           threads=1)
    yield g
    g.close()


def cli_samples(smoke_run, out):
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "fake-000003.png").write_bytes(b"stale")
    (out / "fake-000099.png").write_bytes(b"from a larger run")
    return run_script("generate.py", "--checkpoint", smoke_run, "-n", 10, "--batch-size", 7,
                      "--seed", SEED, "--out", out, "--threads", 1, check=True)


def cli_quiz(smoke_run, out):
    return run_script("generate.py", "--checkpoint", smoke_run, "--turing", "--real", "data",
                      "--seed", SEED, "--out", out, "--threads", 1, check=True)


def cli_interpolation(smoke_run, out):
    return run_script("generate.py", "--checkpoint", smoke_run, "--interpolate", "--points", 3,
                      "--frames", 5, "--seed", SEED, "--out", out, "--threads", 1, check=True)


LOAD = """
import sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
z = np.load(sys.argv[2])
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
spec = serve.structured_input_signature[1]["z"]
assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, z.shape[1]], spec
np.save(sys.argv[3], serve(z=tf.constant(z))["images"].numpy())
np.save(sys.argv[4], serve(z=tf.constant(z[:1]))["images"].numpy())
"""


def cli_export_then_load(smoke_run, out):
    """--export, then the SavedModel on latents(10, SEED) in a fresh TF2 process."""
    out.mkdir()
    proc = run_script("generate.py", "--checkpoint", smoke_run, "--export", out / "saved",
                      check=True)
    m = json.loads(open(os.path.join(smoke_run, "config.json")).read())["model"]
    z = sampling.sample_latents(np.random.default_rng(SEED), (10, m["z_dim"]), m["z_dist"])
    np.save(out / "z.npy", z)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-c", LOAD, out / "saved", out / "z.npy", out / "all.npy",
                    out / "one.npy"], check=True, env=env, capture_output=True, timeout=300)
    return proc


@pytest.fixture(scope="module")
def modes(smoke_run, tmp_path_factory):
    """Every mode of generate.py once on the smoke run: futures of (process, out folder).

    Five subprocesses cost ~5 s of TensorFlow import each; they run two at a
    time, alongside the in-process tests, to keep this file well under a minute.
    """
    base = tmp_path_factory.mktemp("generate")
    runs = {"export": cli_export_then_load, "samples": cli_samples, "quiz": cli_quiz,
            "interpolation": cli_interpolation}  # longest first
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(lambda run=run, out=base / name: (run(smoke_run, out), out))
               for name, run in runs.items()}


# ---------------------------------------------------------------- samples

def test_samples_do_not_depend_on_the_batch_size(smoke_run, gen, modes):
    proc, out = modes["samples"].result()  # -n 10 --batch-size 7
    assert "10 images" in proc.stdout and str(out) in proc.stdout and "step 40" in proc.stdout
    assert "replacing 1 existing" in proc.stdout and "1 other fake-*.png" in proc.stdout
    # Outputs of the same names are replaced; nothing else is touched.
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "fake-000099.png").read_bytes() == b"from a larger run"
    cli_7 = np.stack([np.asarray(Image.open(out / f"fake-{i:06d}.png")) for i in range(10)])
    assert cli_7.shape == (10, SIZE, SIZE, 3) and cli_7.dtype == np.uint8

    z = gen.latents(10, SEED)
    api_64 = gen.generate(z)
    one = sampling.Generator(smoke_run, batch_size=1, threads=1)
    try:
        api_1 = one.generate(z)
    finally:
        one.close()
    for other in (api_1, cli_7):
        assert np.abs(api_64.astype(int) - other.astype(int)).max() <= 1
    assert len({img.tobytes() for img in api_64}) == 10  # ten different latents, ten images


@pytest.mark.parametrize("mode, batch", [(["-n", "3"], 3), (["-n", "5000"], generate.MAX_BATCH),
                                         (["--turing", "--real", "data"], 6 * 6),
                                         (["--interpolate"], 4 * 16), (["-n", "9"], 9)])
def test_a_huge_batch_size_is_cut_to_what_the_mode_makes(mode, batch, tmp_path):
    """--batch-size 100000000 ran a graph of that batch (and crashed); images do not depend on it."""
    args = generate.parse_args(["--checkpoint", str(tmp_path), *mode, "--out", str(tmp_path / "o"),
                                "--batch-size", "100000000"])
    assert generate.run_batch(args) == batch


@pytest.mark.parametrize("mode", [["--interpolate", "--points", "100000", "--frames", "100000"],
                                  ["--turing", "--real", "data", "--rows", "100", "--cols", "100"]])
def test_a_picture_too_large_for_memory_is_refused_up_front(mode, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        generate.parse_args(["--checkpoint", str(tmp_path), *mode, "--out", str(tmp_path / "o")])
    # the two options whose product is too large, and the most one picture holds
    assert_clear_error(stop.value.code, capsys.readouterr().err, mode[-4], mode[-2], "4,096")


def test_paths_from_home_are_expanded(tmp_path, monkeypatch):
    """--out '~/x' made a folder called '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = generate.parse_args(["--checkpoint", "~/run", "--turing", "--real", "~/tiles",
                                "--out", "~/quiz"])
    assert (args.checkpoint, args.real, args.out) == (
        str(tmp_path / "run"), str(tmp_path / "tiles"), str(tmp_path / "quiz"))


def test_latents_drawn_batch_by_batch_equal_one_draw():
    for dist in ("uniform", "normal"):
        rng = np.random.default_rng(SEED)
        chunks = np.concatenate([sampling.sample_latents(rng, (k, 5), dist) for k in (3, 1, 6)])
        whole = sampling.sample_latents(np.random.default_rng(SEED), (10, 5), dist)
        np.testing.assert_array_equal(chunks, whole)
    uniform = sampling.sample_latents(np.random.default_rng(0), (1000, 5), "uniform")
    assert uniform.min() >= -1 and uniform.max() <= 1 and uniform.dtype == np.float32


# ---------------------------------------------------------------- the Turing quiz

def cell(picture, row, col, cell_px, gap):
    """One quiz cell, shrunk back to the model's size (the quiz upscales by a whole factor)."""
    top, left, k = row * (cell_px + gap), col * (cell_px + gap), cell_px // SIZE
    return picture[top:top + cell_px:k, left:left + cell_px:k]


def test_quiz_answer_marks_exactly_the_fakes(modes):
    proc, out = modes["quiz"].result()
    assert "quiz.png" in proc.stdout and "step 40" in proc.stdout
    answer = json.loads((out / "answer.json").read_text())
    assert (answer["rows"], answer["cols"], answer["pattern"]) == (6, 6, "N")
    assert answer["seed"] == SEED and answer["step"] == 40
    assert answer["checkpoint"].endswith(os.path.join("checkpoints", "model-40"))
    assert answer["split"] == "holdout"  # the bundled sample's manifest has holdout rows
    expected = [[r, c] for r, c in zip(*np.nonzero(generate.n_pattern(6, 6)))]
    assert answer["fakes"] == expected

    quiz = np.asarray(Image.open(out / "quiz.png"))
    marked = np.asarray(Image.open(out / "answer.png"))
    px, gap = answer["cell_px"], answer["gap_px"]
    assert px >= generate.DISPLAY_PX and quiz.shape == (6 * px + 5 * gap,) * 2 + (3,)
    files = [r["file"] for r in answer["reals"]]
    assert len(set(files)) == len(files) == 36 - len(expected)
    assert all(os.sep + "holdout" + os.sep in f for f in files)
    reals = {}
    for r in answer["reals"]:
        reals[r["row"], r["col"]] = data.read_tile(r["file"], SIZE)
        here = cell(quiz, r["row"], r["col"], px, gap)
        np.testing.assert_array_equal(here, reals[r["row"], r["col"]])
        np.testing.assert_array_equal(cell(marked, r["row"], r["col"], px, gap), here)
    assert set(reals) | {tuple(f) for f in expected} == {(r, c) for r in range(6) for c in range(6)}
    for r, c in expected:
        fake = cell(quiz, r, c, px, gap).astype(int)
        assert all(np.abs(fake - real).mean() > 2 for real in reals.values())
        assert (cell(marked, r, c, px, gap)[0] == generate.ANSWER_RGB).all()  # framed in red


def test_n_pattern_is_the_letter_n():
    drawn = ["".join("N" if x else "." for x in row) for row in generate.n_pattern(6, 6)]
    assert drawn == ["N....N", "NN...N", "N.N..N", "N..N.N", "N...NN", "N....N"]
    wide = generate.n_pattern(4, 7)  # diagonal from top-left to bottom-right, one cell per row
    assert wide[0, 0] and wide[-1, -1] and wide[:, 0].all() and wide[:, -1].all()
    diagonal = [np.nonzero(row[1:-1])[0] for row in wide[1:-1]]
    assert all(len(d) == 1 for d in diagonal) and diagonal[0][0] < diagonal[1][0]


def test_random_pattern_is_seeded_and_has_the_n_count():
    a = generate.random_pattern(6, 6, 16, np.random.default_rng(1))
    b = generate.random_pattern(6, 6, 16, np.random.default_rng(1))
    assert a.sum() == 16 and (a == b).all()
    assert not (a == generate.random_pattern(6, 6, 16, np.random.default_rng(2))).all()


def test_answer_frames_the_fakes_and_leaves_the_reals():
    mask = generate.n_pattern(3, 3)
    fakes = np.full((mask.sum(), 4, 4, 3), 10, np.uint8)
    reals = np.arange(2)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8) + 100
    cells = generate.quiz_cells(mask, fakes, reals)
    assert cells[1, 0, 0, 0] == 100 and cells[7, 0, 0, 0] == 101  # reals in row-major order
    big = generate.upscale(cells, 32)
    assert big.shape[1] == 32 and (big[:, ::8, ::8] == cells).all()
    quiz = generate.tile_grid(big, 3)
    answer = generate.mark_answer(quiz, mask, 32)
    red = generate.ANSWER_RGB
    for r in range(3):
        for c in range(3):
            top, left = generate.cell_origin(r, c, 32)
            before, after = quiz[top:top + 32, left:left + 32], answer[top:top + 32, left:left + 32]
            if mask[r, c]:
                assert (after[0] == red).all() and (after[:, -1] == red).all()
                assert (after[8:-8, 8:-8] == before[8:-8, 8:-8]).all()
            else:
                assert (after == before).all()


def test_default_split_prefers_the_holdout(tmp_path):
    assert data.comparison_split(os.path.join(ROOT, "data")) == "holdout"
    (tmp_path / "manifest.csv").write_text("file,source,x,y,split\na.png,s,0,0,train\n")
    assert data.comparison_split(str(tmp_path)) == "train"
    assert data.comparison_split(str(tmp_path / "manifest.csv")) == "train"
    assert data.comparison_split(write_tiles(str(tmp_path / "plain"), 1)) == ""


def test_too_few_real_tiles_is_a_clear_error(smoke_run, tmp_path, capsys):
    few = write_tiles(str(tmp_path / "few"), 5, size=SIZE)
    code = generate.cli(["--checkpoint", smoke_run, "--turing", "--real", few,
                         "--out", str(tmp_path / "q"), "--threads", "1"])
    # the folder, the tiles it holds, the tiles the quiz needs, and what to do
    assert_clear_error(code, capsys.readouterr().err, (few, "5", "20"), "--rows", "--cols",
                       nothing_written=tmp_path / "q")


# ---------------------------------------------------------------- interpolation

def test_interpolation_is_a_closed_loop(modes):
    proc, out = modes["interpolation"].result()  # --points 3 --frames 5
    assert "interpolation.gif" in proc.stdout and "step 40" in proc.stdout
    grid = np.asarray(Image.open(out / "interpolation.png"))
    px, gap = generate.DISPLAY_PX, generate.GAP_PX
    assert grid.shape == (3 * px + 2 * gap, 5 * px + 4 * gap, 3)
    rows = [[cell(grid, r, c, px, gap).astype(int) for c in range(5)] for r in range(3)]
    for r in range(3):  # each row ends where the next begins, the last where the first began
        assert np.abs(rows[r][-1] - rows[(r + 1) % 3][0]).max() <= 1
        assert np.abs(rows[r][0] - rows[r][2]).mean() > 0.5  # the images do change on the way
    gif = Image.open(out / "interpolation.gif")
    assert gif.n_frames == 3 * 4 and gif.info["loop"] == 0  # loops forever, no repeated frame
    assert gif.size[0] >= generate.GIF_PX


def test_slerp_follows_the_great_circle():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])
    path = generate.slerp(a, b, np.linspace(0, 1, 5))
    np.testing.assert_allclose(path[0], a, atol=1e-6)
    np.testing.assert_allclose(path[-1], b, atol=1e-6)
    u, v = np.array([3.0, 0.0]), np.array([0.0, 3.0])
    mid = generate.slerp(u, v, [0.5])[0]
    np.testing.assert_allclose(mid, [3 / np.sqrt(2)] * 2, atol=1e-5)  # length kept, unlike lerp
    np.testing.assert_allclose(np.linalg.norm(generate.slerp(u, v, np.linspace(0, 1, 9)), axis=1),
                               3.0, atol=1e-5)
    same = generate.slerp(u, 2 * u, [0.5])[0]  # parallel: falls back to a straight line
    np.testing.assert_allclose(same, 1.5 * u, atol=1e-5)
    loop = generate.loop_latents(np.eye(3, dtype=np.float32), 4)
    assert loop.shape == (3, 4, 3)
    np.testing.assert_allclose(loop[:, -1], np.roll(loop[:, 0], -1, axis=0), atol=1e-6)


# ---------------------------------------------------------------- SavedModel

def test_saved_model_reproduces_generate_in_a_fresh_process(gen, modes):
    proc, out = modes["export"].result()
    assert "serving_default" in proc.stdout and "step 40" in proc.stdout
    z = gen.latents(10, SEED)
    np.testing.assert_array_equal(z, np.load(out / "z.npy"))
    export = out / "saved"
    served, first = np.load(out / "all.npy"), np.load(out / "one.npy")
    assert served.dtype == np.uint8 and served.shape == (10, SIZE, SIZE, 3)
    expected = gen.generate(z).astype(int)
    assert np.abs(served.astype(int) - expected).max() <= 1
    assert np.abs(first.astype(int) - expected[:1]).max() <= 1
    info = json.loads((export / "assets.extra" / "satgan.json").read_text())
    assert info["z_dim"] == z.shape[1] and info["step"] == 40


def test_an_export_it_cannot_write_is_one_error_line(smoke_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("mine")
    code = generate.cli(["--checkpoint", smoke_run, "--export", str(tmp_path / "a_file" / "sub")])
    # the folder asked for, then the file in its way
    assert_clear_error(code, capsys.readouterr().err,
                       ("--export", tmp_path / "a_file" / "sub", tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "mine"


@pytest.mark.parametrize("mode", [["-n", "2"], ["--interpolate"]])
def test_an_out_it_cannot_write_is_one_error_line(smoke_run, tmp_path, capsys, mode):
    (tmp_path / "a_file").write_text("mine")
    code = generate.cli(["--checkpoint", smoke_run, *mode, "--out", str(tmp_path / "a_file" / "sub")])
    assert_clear_error(code, capsys.readouterr().err, tmp_path / "a_file" / "sub")
    assert (tmp_path / "a_file").read_text() == "mine"


def test_export_refuses_a_folder_in_use(smoke_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code = generate.cli(["--checkpoint", smoke_run, "--export", str(tmp_path)])
    assert_clear_error(code, capsys.readouterr().err, "--export", tmp_path)
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_help_says_how_to_load_the_export(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = capsys.readouterr().out
    assert 'tf.saved_model.load(DIR)' in text and 'signatures["serving_default"]' in text


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("mode", [["-n", "3"], ["--interpolate"]])
def test_negative_seed_is_a_usage_error(mode, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.cli(["--checkpoint", str(tmp_path), *mode, "--seed", "-1",
                      "--out", str(tmp_path / "o")])
    assert_clear_error(exit_.value.code, capsys.readouterr().err, "--seed", "-1",
                       nothing_written=tmp_path / "o")


def test_a_count_below_one_names_the_flag_as_typed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.cli(["--checkpoint", str(tmp_path), "-n", "0", "--out", str(tmp_path / "o")])
    assert_clear_error(exit_.value.code, capsys.readouterr().err, "-n", "0", unnamed=["--n"],
                       nothing_written=tmp_path / "o")


def test_problems_with_real_tiles_say_what_to_do_with_real(smoke_run, tmp_path, capsys):
    """--real's tiles: the hint names --real, not train.py's data.* keys."""
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(2):
        Image.fromarray(np.full((SIZE, SIZE), 40 * i, np.uint8)).save(gray / f"{i}.png")
    for real in (gray, tmp_path / "missing"):
        code = generate.cli(["--checkpoint", smoke_run, "--turing", "--real", str(real),
                             "--out", str(tmp_path / "q"), "--threads", "1"])
        assert_clear_error(code, capsys.readouterr().err, "--real", real,
                           unnamed=["data.grayscale", "data.path"], listing=True,
                           nothing_written=tmp_path / "q")


def test_missing_checkpoint_is_one_clear_line(smoke_run, tmp_path, capsys):
    missing = os.path.join(smoke_run, "checkpoints", "model-999")
    code = generate.cli(["--checkpoint", missing, "-n", "2", "--out", str(tmp_path / "o")])
    assert_clear_error(code, capsys.readouterr().err, missing, nothing_written=tmp_path / "o")
    index = os.path.join(smoke_run, "checkpoints", "checkpoint")  # TensorFlow's index file
    code = generate.cli(["--checkpoint", index, "-n", "2", "--out", str(tmp_path / "o")])
    assert_clear_error(code, capsys.readouterr().err, index, nothing_written=tmp_path / "o")


def test_other_architecture_is_one_clear_line(smoke_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(os.path.join(smoke_run, "checkpoints"), copy / "checkpoints")
    cfg = json.loads(open(os.path.join(smoke_run, "config.json")).read())
    cfg["model"]["gen_filters"] *= 2
    (copy / "config.json").write_text(json.dumps(cfg))
    code = generate.cli(["--checkpoint", str(copy / "checkpoints" / "model-40"), "-n", "2",
                         "--out", str(tmp_path / "o")])
    m = cfg["model"]
    saved_shape = [m["z_dim"], 4 * 4 * m["gen_filters"] // 2]
    # the config that does not fit, and a variable with the shape the checkpoint holds
    assert_clear_error(code, capsys.readouterr().err, copy / "config.json",
                       ("generator/project/w", saved_shape), nothing_written=tmp_path / "o")


def test_real_takes_path_colon_split_like_evaluate(smoke_run, tmp_path, capsys):
    sample = os.path.join(ROOT, "data")
    code = generate.cli(["--checkpoint", smoke_run, "--turing", "--real", f"{sample}:train",
                         "--out", str(tmp_path / "quiz"), "--rows", "3", "--cols", "3"])
    assert code == 0, capsys.readouterr().err
    answer = json.loads((tmp_path / "quiz" / "answer.json").read_text())
    assert answer["real_source"] == sample and answer["split"] == "train"
    code = generate.cli(["--checkpoint", smoke_run, "--turing", "--real", f"{sample}:train",
                         "--split", "holdout", "--out", str(tmp_path / "quiz2")])
    assert_clear_error(code, capsys.readouterr().err, "--real", ("--split", "holdout"),
                       "'train'", nothing_written=tmp_path / "quiz2")


def test_export_onto_a_file_says_it_is_a_file(smoke_run, tmp_path, capsys):
    (tmp_path / "gen").write_text("mine")
    code = generate.cli(["--checkpoint", smoke_run, "--export", str(tmp_path / "gen")])
    assert_clear_error(code, capsys.readouterr().err, "--export", tmp_path / "gen")
    assert (tmp_path / "gen").read_text() == "mine"


def test_an_out_under_a_file_is_a_clear_error(smoke_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "sub"
    code = generate.cli(["--checkpoint", smoke_run, "-n", "2", "--out", str(out)])
    assert_clear_error(code, capsys.readouterr().err, "--out", str(tmp_path / "a_file"))
