"""Pure decisions, the history cache and the config: no TensorFlow graph needed."""
import json
import os

import numpy as np
import pytest

import config
from history_cache import HistoryCache
from conftest import ROOT, assert_named
from gan import choose_path, history_count, use_history


# ---------------------------------------------------------------- Lesson 39
@pytest.mark.parametrize("real_acc, fake_acc, path", [
    (1.0, 1.0, "B"),    # D judges both halves well: the light path
    (0.51, 0.9, "B"),
    (0.5, 0.9, "A"),    # half the reals called fake
    (0.9, 0.5, "A"),    # half the fakes called real
    (0.2, 0.1, "A"),    # both
    (0.0, 1.0, "A"),
])
def test_path_choice(real_acc, fake_acc, path):
    assert choose_path(real_acc, fake_acc) == path


# ---------------------------------------------------------------- Lesson 33
def test_history_replay_needs_coin_and_enough_images():
    assert use_history(0.1, 0.3, cached=32, needed=32)
    assert not use_history(0.3, 0.3, cached=32, needed=32)
    assert not use_history(0.1, 0.3, cached=31, needed=32)
    assert not use_history(0.0, 0.0, cached=100, needed=1)
    assert history_count(64, 0.5) == 32


def test_history_replay_rate_is_the_configured_probability():
    rng = np.random.default_rng(0)
    used = [use_history(rng.random(), 0.3, 10, 1) for _ in range(20000)]
    assert abs(np.mean(used) - 0.3) < 0.01


# ---------------------------------------------------------------- history cache
def _img(value, shape=(4, 4, 3)):
    return np.full(shape, value, np.uint8)


def test_cache_fills_then_replaces_and_samples_distinct_images():
    cache = HistoryCache(5, (4, 4, 3), seed=0)
    for v in range(3):
        cache.add(_img(v))
    assert len(cache) == 3
    assert sorted(cache.sample(3)[:, 0, 0, 0]) == [0, 1, 2]
    with pytest.raises(ValueError, match="holds 3"):
        cache.sample(4)
    for v in range(3, 100):
        cache.add(_img(v))
    assert len(cache) == 5
    values = set(cache.images[:, 0, 0, 0])
    assert len(values) == 5 and max(values) > 50  # new images keep arriving
    assert min(values) < 90  # ...but old ones survive too (random replacement)


def test_cache_only_takes_uint8_images_of_its_shape():
    """Lesson 35: the cache holds images in the real path's range (uint8), nothing else."""
    cache = HistoryCache(2, (4, 4, 3))
    with pytest.raises(ValueError, match="uint8"):
        cache.add(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        cache.add(np.zeros((8, 8, 3), np.uint8))


def test_cache_state_round_trip_continues_identically(tmp_path):
    a = HistoryCache(4, (2, 2, 3), seed=7)
    for v in range(6):
        a.add(_img(v, (2, 2, 3)))
    np.savez(tmp_path / "s.npz", **a.state())
    b = HistoryCache(4, (2, 2, 3), seed=99)
    with np.load(tmp_path / "s.npz") as f:
        b.load_state({k: f[k] for k in f.files})
    for v in range(6, 12):
        a.add(_img(v, (2, 2, 3)))
        b.add(_img(v, (2, 2, 3)))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.sample(3), b.sample(3))


# ---------------------------------------------------------------- config
def test_defaults_are_the_article_values():
    c = config.Config()
    assert (c.model.gen_filters, c.model.disc_filters, c.model.kernel, c.model.z_dim) == (1024, 1024, 5, 100)
    assert (c.train.lr_gen, c.train.lr_disc, c.train.beta1) == (2e-4, 1.5e-4, 0.5)
    assert (c.train.checkpoint_every, c.train.sample_every, c.train.steps) == (500, 10, 20000)
    assert (c.train.history_prob, c.model.reg_scale, c.train.batch_size) == (0.3, 1e-4, 64)


def test_json_then_set_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"steps": 7, "lr_gen": 1}, "model": {"gen_leaky": True}}))
    c = config.load(str(path), ["train.steps=9", "data.path=/x y", "train.lr_disc=3e-4"])
    assert c.train.steps == 9 and c.train.lr_gen == 1.0 and c.model.gen_leaky is True
    assert c.data.path == "/x y" and c.train.lr_disc == 3e-4


@pytest.mark.parametrize("item, names", [  # the key, the value given, what would do
    ("train.stepz=3", ["train.stepz", "steps"]),
    ("trian.steps=3", ["trian", "train"]),
    ("train.steps=abc", ["train.steps", "int", "abc"]),
    ("train.steps=2.5", ["train.steps", "int", "2.5"]),
    ("model.gen_leaky=maybe", ["model.gen_leaky", "bool", "maybe"]),
    ("train.steps", ["train.steps", "section.key=value"]),
    ("train.batch_size=0", ["train.batch_size", "0"]),
    ("train.lr_gen=0", ["train.lr_gen", "0"]),
    ("train.steps=-5", ["train.steps", "-5"]),
    ("model.image_size=48", ["model.image_size", "48"]),
    ("model.gen_filters=100", ["model.gen_filters", "100", "16"]),
    ("train.history_prob=1.5", ["train.history_prob", "1.5"]),
    ("data.grayscale=keep", ["data.grayscale", "keep", "error", "convert"]),
    ("data.load_size=32", ["data.load_size", "32", "model.image_size", "64"]),
    ("data.load_size=-1", ["data.load_size", "-1"]),
    ("train.lr_gen=nan", ["train.lr_gen", "nan"]),
    ("train.beta1=1", ["train.beta1"]),
    ("model.leaky_slope=-1", ["model.leaky_slope", "-1"]),
    ("model.channels=1", ["model.channels", "1", "3"]),
])
def test_bad_overrides_name_the_key(item, names):
    with pytest.raises(config.ConfigError) as e:
        config.load(None, [item])
    assert_named(str(e.value), *names)


def test_evaluations_need_four_images():
    with pytest.raises(config.ConfigError) as e:
        config.load(None, ["train.eval_every=5", "train.eval_images=2"])
    assert_named(str(e.value), "train.eval_images", "2", "4", "train.eval_every")
    assert config.load(None, ["train.eval_images=2"]).train.eval_images == 2  # evaluations off


def test_a_key_set_twice_is_refused():
    with pytest.raises(config.ConfigError) as e:
        config.load(None, ["train.steps=3", "train.lr_gen=1e-3", "train.steps=4"])
    assert_named(str(e.value), "--set", "train.steps")


@pytest.mark.parametrize("item", ["=\n", "\n=1", "data.grayscale=a\nb"])
def test_a_bad_set_item_is_shown_on_one_line(item):
    with pytest.raises(config.ConfigError) as e:
        config.load(None, [item])
    message = str(e.value)
    shown = (repr(item), repr(item.partition("=")[2].strip()))  # the whole item, or its value
    assert "\n" not in message and any(text in message for text in shown)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.load(str(tmp_path / "missing.json"))
    assert_named(str(e.value), tmp_path / "missing.json", "configs/")  # and where configs are
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(tmp_path / "bad.json"))
    assert_named(str(e.value), tmp_path / "bad.json", "line 1")  # where the JSON breaks
    (tmp_path / "key.json").write_text('{"model": {"filters": 3}}')
    with pytest.raises(config.ConfigError) as e:
        config.load(str(tmp_path / "key.json"))
    # the file, the key, and the keys there are
    assert_named(str(e.value), tmp_path / "key.json", "model.filters", "gen_filters")
    (tmp_path / "kind.json").write_text('{"train": {"steps": "many"}}')
    with pytest.raises(config.ConfigError) as e:
        config.load(str(tmp_path / "kind.json"))
    assert_named(str(e.value), tmp_path / "kind.json", "train.steps", "int")


@pytest.mark.parametrize("name", ["article", "cpu", "smoke"])
def test_shipped_configs_load(name):
    config.load(os.path.join(ROOT, "configs", f"{name}.json"))


def test_thread_default_leaves_a_core_free_on_bigger_machines():
    """Lesson 28."""
    assert config.default_threads(2) == 2
    assert config.default_threads(4) == 3
    assert config.default_threads(16) == 15


# ---------------------------------------------------------------- scripts over libraries

ENTRY_SCRIPTS = ("train", "generate", "evaluate", "prepare", "bench", "bench_torch")


def test_no_module_imports_an_entry_script():
    """Scripts import libraries, never each other (tools/ included)."""
    import ast
    files = [os.path.join(ROOT, n) for n in os.listdir(ROOT) if n.endswith(".py")]
    files += [os.path.join(ROOT, "tools", n) for n in os.listdir(os.path.join(ROOT, "tools"))
              if n.endswith(".py")]
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read())
        imported = {a.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & set(ENTRY_SCRIPTS), path


@pytest.mark.parametrize("script", ["train", "generate", "evaluate", "prepare", "bench"])
def test_a_bad_command_line_is_one_error_line_like_every_other_mistake(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(["--no-such-option"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert_named(err, f"python {script}.py --help")
