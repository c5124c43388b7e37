"""The run configuration: defaults here, JSON files in configs/, --set on top.

`load(path, overrides)` returns a Config or raises ConfigError naming the
offending key; nothing else in the project parses configuration.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from cli import UserError


class ConfigError(UserError):
    """A config the user wrote is wrong; the message names the key."""


@dataclass
class DataConfig:
    path: str = "data"             # folder of tiles, or a manifest.csv (searched recursively)
    split: str = "train"           # manifest split to read ("" = every row); ignored for plain folders
    grayscale: str = "error"       # grayscale tiles: "error" stops, "convert" replicates to RGB
    bad_files: str = "error"       # unreadable files: "error" stops, "skip" reports and drops them
    augment: bool = True           # random flips and 90-degree turns (overhead imagery has no "up")
    in_memory: bool = True         # False: read each batch from disk in a background thread
    load_size: int = 0             # > model.image_size: tiles are loaded at this size and every
                                   # step trains on random model.image_size crops of them (0: off)


@dataclass
class ModelConfig:
    image_size: int = 64           # tile side in pixels, power of two >= 8
    channels: int = 3              # RGB
    z_dim: int = 100               # latent size
    z_dist: str = "uniform"        # latent distribution: "uniform" (-1..1) or "normal"
    kernel: int = 5                # conv kernel side in pixels
    gen_filters: int = 1024        # generator filters at 4x4, halved per 2x upsampling
    disc_filters: int = 1024       # discriminator filters at 4x4, mirrored
    extra_layers: int = 1          # stride-1 layers at full resolution (checkerboard fix)
    upsample: str = "transposed"   # G's 2x steps: "transposed" (stride-2 transposed conv, the
                                   # write-up's) or "resize" (nearest-neighbour resize + conv)
    minibatch_std: int = 0         # D's 4x4 features gain their spread over groups of this many
                                   # images (Karras et al. 2018), against one image for every
                                   # latent; divides train.batch_size (0 = off)
    gen_leaky: bool = False        # leaky ReLU in the generator too
    leaky_slope: float = 0.2       # negative slope of leaky ReLU
    bn_momentum: float = 0.9       # moving-average decay of batch-norm statistics
    reg_scale: float = 1e-4        # L2 regulariser constant on the weights of each net


@dataclass
class TrainConfig:
    steps: int = 20000             # total training steps (one D update + two G updates each)
    batch_size: int = 64           # real images per step (D sees as many fakes besides)
    seed: int = 0                  # seeds the TF graph and NumPy
    lr_gen: float = 2e-4           # Adam learning rate of the generator
    lr_disc: float = 1.5e-4        # Adam learning rate of the three discriminator optimisers
    beta1: float = 0.5             # Adam beta1 of all four optimisers
    real_label: float = 1.0        # D's target for reals; below 1 smooths it, one-sided
                                   # (Salimans et al. 2016); 1 = off
    history_prob: float = 0.3      # probability that a step shows D cached old fakes
    history_fraction: float = 0.5  # share of the fake half replaced when it does
    history_size: int = 1000       # images kept in the history cache
    log_every: int = 1             # steps between log.jsonl records (the last step always)
    sample_every: int = 10         # steps between sample grids
    checkpoint_every: int = 500    # steps between checkpoints
    keep_checkpoints: int = 5      # newest checkpoints kept on disk
    eval_every: int = 0            # steps between SWD/MS-SSIM evaluations (0 = off); best kept
    eval_images: int = 512         # generated images per evaluation
    g_average: float = 0.0         # decay of a moving average of G's weights that samples,
                                   # evaluations and generate.py use (0 = off; e.g. 0.999);
                                   # training itself never reads it
    d_augment: str = ""            # augment every image D sees, reals and fakes, in D's and G's
                                   # updates (Zhao et al. 2020): comma-separated names of
                                   # color, translation, cutout ("" = off)
    d_augment_from: str = "start"  # when d_augment starts: "start" (the first step) or
                                   # "collapse" (the first evaluation during training that
                                   # finds the fakes over 1.5x as alike as the training tiles)


@dataclass
class RunConfig:
    threads: int = 0               # intra-op threads; 0 = all cores below 4, else cores - 1
    inter_op_threads: int = 1      # independent ops run at once
    mixed_precision: str = "none"  # "none" (float32), "bf16" (CPU oneDNN rewrite), "fp16" (GPU, loss scaling)
    xla: bool = False              # XLA JIT compilation of the graph (for GPUs)
    device: str = "auto"           # what runs the graph: "auto" (a GPU when TensorFlow sees one),
                                   # "cpu" (even on a GPU machine), "gpu" (an error without one)
    deterministic: bool = False    # TensorFlow's deterministic kernels: exact resume on a GPU too
                                   # (a CPU's already are); slower on a GPU


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


CHOICES = {
    "data.grayscale": ("error", "convert"),
    "data.bad_files": ("error", "skip"),
    "model.z_dist": ("uniform", "normal"),
    "model.upsample": ("transposed", "resize"),
    "train.d_augment_from": ("start", "collapse"),
    "run.mixed_precision": ("none", "bf16", "fp16"),
    "run.device": ("auto", "cpu", "gpu"),
}

GENERATOR_WEIGHTS = ("averaged", "trained")  # --weights of generate.py and evaluate.py
D_AUGMENTS = ("color", "translation", "cutout")  # train.d_augment's names (d_augment.py)

# Keys that change the shape or meaning of the checkpointed graph, or of the
# history cache kept beside it: a resume must keep the run's values.
ARCHITECTURE_KEYS = ("model.image_size", "model.channels", "model.z_dim", "model.kernel",
                     "model.gen_filters", "model.disc_filters", "model.extra_layers",
                     "model.gen_leaky", "model.upsample", "model.minibatch_std",
                     "train.batch_size", "train.history_size",
                     "train.g_average")


def _section(cfg, name, key):
    if name not in {f.name for f in dataclasses.fields(cfg)}:
        raise ConfigError(f"unknown config section {name!r} in {key!r}; "
                          f"sections are: {', '.join(f.name for f in dataclasses.fields(cfg))}")
    return getattr(cfg, name)


def _typed(key, value, kind, from_text=False):
    """`value` as the field's type: a JSON value as it is, a --set string parsed."""
    if from_text and kind is not str:
        text = value.strip()
        try:
            value = json.loads(text.lower() if kind is bool else text)
        except (json.JSONDecodeError, RecursionError):
            try:  # nan, inf: parsed here so that validate() names the real problem
                value = float(text) if kind is float else None
            except ValueError:
                value = None
            if value is None:
                raise ConfigError(f"config key '{key}' expects {kind.__name__}, "
                                  f"got {text!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"config key '{key}' expects a float, got an integer too large "
                              f"for one") from None
    if type(value) is not kind:
        raise ConfigError(f"config key '{key}' expects {kind.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _set(cfg, key, value, from_text=False):
    section_name, _, name = key.partition(".")
    section = _section(cfg, section_name, key)
    kinds = {f.name: f.type for f in dataclasses.fields(section)}
    if name not in kinds:
        raise ConfigError(f"unknown config key {key!r}; keys of '{section_name}' are: "
                          f"{', '.join(kinds)}")
    setattr(section, name, _typed(key, value, kinds[name], from_text))


MIN_EVAL_IMAGES = 4  # SWD and MS-SSIM compare two halves of each set


def validate(cfg):
    """Raise ConfigError for values no run can use, before any graph is built."""
    d, m, t, r = cfg.data, cfg.model, cfg.train, cfg.run
    for key, choices in CHOICES.items():
        value = get(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")
    positive = {"model.channels": m.channels, "model.z_dim": m.z_dim, "model.kernel": m.kernel,
                "model.gen_filters": m.gen_filters, "model.disc_filters": m.disc_filters,
                "train.steps": t.steps, "train.batch_size": t.batch_size,
                "train.lr_gen": t.lr_gen, "train.lr_disc": t.lr_disc,
                "train.log_every": t.log_every, "train.sample_every": t.sample_every,
                "train.checkpoint_every": t.checkpoint_every,
                "train.keep_checkpoints": t.keep_checkpoints,
                "train.history_size": t.history_size, "train.eval_images": t.eval_images,
                "run.inter_op_threads": r.inter_op_threads}
    for key, value in flat(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    for key in ("model.extra_layers", "model.reg_scale", "train.seed", "run.threads",
                "train.eval_every", "data.load_size"):
        if get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get(cfg, key)}")
    size = m.image_size
    if size < 8 or size & (size - 1):
        raise ConfigError(f"config key 'model.image_size' must be a power of two >= 8, got {size}")
    levels = size.bit_length() - 3  # 2x steps from 4x4
    for key in ("model.gen_filters", "model.disc_filters"):
        if get(cfg, key) % 2 ** levels:
            raise ConfigError(f"config key '{key}' must be divisible by {2 ** levels} "
                              f"(it is halved {levels} times up to model.image_size {size}), "
                              f"got {get(cfg, key)}")
    for key in ("train.history_prob", "train.history_fraction", "model.bn_momentum"):
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ConfigError(f"config key '{key}' must be within 0..1, got {get(cfg, key)}")
    for key in ("train.beta1", "model.leaky_slope", "train.g_average"):  # 1: Adam stalls,
        # ReLU turns linear, the average never moves
        if not 0.0 <= get(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}' must be at least 0 and below 1, "
                              f"got {get(cfg, key)}")
    if not 0.5 < t.real_label <= 1.0:
        raise ConfigError(f"config key 'train.real_label' must be above 0.5 and at most 1, "
                          f"got {t.real_label}")
    if m.channels != 3:
        raise ConfigError(f"config key 'model.channels' must be 3 (tiles are read as RGB), "
                          f"got {m.channels}")
    if t.eval_every and t.eval_images < MIN_EVAL_IMAGES:
        raise ConfigError(f"config key 'train.eval_images' must be at least {MIN_EVAL_IMAGES} "
                          f"when train.eval_every is on, got {t.eval_images}")
    if d.load_size and d.load_size < size:
        raise ConfigError(f"config key 'data.load_size' must be 0 (off) or >= model.image_size "
                          f"{size}, got {d.load_size}")
    if m.minibatch_std < 0 or (m.minibatch_std and t.batch_size % m.minibatch_std):
        raise ConfigError(f"config key 'model.minibatch_std' must be 0 (off) or divide "
                          f"train.batch_size {t.batch_size}, got {m.minibatch_std}")
    if t.d_augment_from == "collapse" and not (augmentations(cfg) and t.eval_every):
        raise ConfigError("config key 'train.d_augment_from' is \"collapse\", which waits for an "
                          "evaluation during training to find one: give train.d_augment its "
                          "augmentations and train.eval_every its steps, or set it to \"start\"")
    augmentations(cfg)
    if not d.path:
        raise ConfigError("config key 'data.path' is empty: give the folder of training tiles")


def augmentations(cfg):
    """train.d_augment as a tuple of names: 'color, cutout' -> ('color', 'cutout'); '' -> ()."""
    names = tuple(name.strip() for name in cfg.train.d_augment.split(",") if name.strip())
    for name in names:
        if name not in D_AUGMENTS:
            raise ConfigError(f"config key 'train.d_augment' names {name!r}; give a comma-separated "
                              f"list of {', '.join(D_AUGMENTS)}, or \"\" for none")
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'train.d_augment' names an augmentation twice: "
                          f"{cfg.train.d_augment!r}")
    return names


def load_size(cfg):
    """Side of the tiles as loaded: data.load_size when it crops, else model.image_size."""
    return max(cfg.data.load_size, cfg.model.image_size)


def get(cfg, key):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def from_dict(raw, where="config"):
    cfg = Config()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object of sections")
    for section_name, values in raw.items():
        if section_name.startswith("_"):
            continue  # "_comment" and the like
        _section(cfg, section_name, where)
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section_name!r} must be a JSON object")
        for name, value in values.items():
            try:
                _set(cfg, f"{section_name}.{name}", value)
            except ConfigError as e:  # name the file the key came from
                raise ConfigError(f"{where}: {e}") from None
    return cfg


def read_json(path):
    if os.path.isdir(path):
        raise ConfigError(f"config file '{path}' is a folder; give a JSON file such as "
                          f"configs/cpu.json (or its run's config.json)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist; "
                          f"pick one of configs/*.json or give a path to your own")
    with open(path, "rb") as f:
        try:
            return json.load(f, object_pairs_hook=_no_repeats)
        except ConfigError as e:
            raise ConfigError(f"config file '{path}': {e}") from None
        except (ValueError, RecursionError) as e:  # also a file that is not UTF-8 text
            raise ConfigError(f"config file '{path}' is not valid JSON: {e}") from None


def _no_repeats(pairs):
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{name!r} is given twice in one object; keep one")
    return dict(pairs)


def load(path=None, overrides=(), base=None):
    """Defaults <- JSON file (or `base` dict) <- `section.key=value` overrides."""
    raw = read_json(path) if path else (base or {})
    cfg = from_dict(raw, path or "config")
    given = set()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        if key.strip() in given:
            raise ConfigError(f"--set gives '{key.strip()}' twice; keep one")
        given.add(key.strip())
        _set(cfg, key.strip(), value, from_text=True)
    validate(cfg)
    return cfg


def differences(a, b, keys):
    """The keys among `keys` whose values differ between configs a and b."""
    return [k for k in keys if get(a, k) != get(b, k)]


def flat(cfg):
    return {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}


def default_threads(cores=None):
    """Lesson 28: leave one core free on machines with 4 or more cores."""
    cores = cores or os.cpu_count() or 1
    return cores - 1 if cores >= 4 else cores


def json_output_problem(path):
    """What is wrong with `path` as a --json file to write after long work, or None.

    Checked before the work (evaluate.py, bench.py), so a typo does not cost the run."""
    if os.path.isdir(path):
        return (f"--json '{path}' is a folder; give a file name "
                f"(e.g. {os.path.join(path, 'out.json')})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--json: folder '{folder}' does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--json: folder '{folder}' is not writable; give another --json"
    return None


def expand_home(args, names):
    """~ in the named path options (one path, or a list of them, as str or Path): a
    shell leaves --out=~/x and '~/x' unexpanded."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, list):
            setattr(args, name, [type(v)(os.path.expanduser(v)) for v in value])
        elif value:
            setattr(args, name, type(value)(os.path.expanduser(value)))
