"""What the README shows, runs: its commands name scripts and options that exist, its run-folder
table names what a run writes, and the docs' code references and links resolve."""
import ast
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

import config

README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Commands in the README's prose: `python ...`, `pip ...`, `tensorboard ...` in backticks.
COMMAND = re.compile(r"(python|pip|tensorboard) ")
INLINE_COMMAND = re.compile(r"`((?:python|pip|tensorboard) [^`]+)`")
CODE_REF = re.compile(r"\b([A-Za-z_]\w*\.py):([A-Za-z_][\w.]*)")  # model.py:generator
TEST_REF = re.compile(r"\b(test_\w+\.py)::(\w+)")                   # test_x.py::test_name
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
# Entries of the run-folder table that a finished 40-step run without evaluations does not hold.
NOT_IN_A_PLAIN_RUN = {
    "lock",                        # only while the process runs
    "checkpoints/best-N.*",        # train.eval_every
    "checkpoints/best",            # train.eval_every
    "checkpoints/after-step-N/",   # a resume from an older checkpoint
}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def readme_commands():
    """Each command of the README: lines of its code blocks (split at &&) and inline ones."""
    text, commands, in_code = read(README), [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:  # a block of commands, or of what a run prints
            commands += [part.strip() for part in line.split("&&")]
    return [c for c in commands + INLINE_COMMAND.findall(text) if COMMAND.match(c)]


def script_commands():
    """(script, tokens after it) of every `python X.py ...` command."""
    found = []
    for command in readme_commands():
        words = shlex.split(command)
        if words[0] == "python" and words[1].endswith(".py"):
            found.append((words[1], [w.strip("[]") for w in words[2:]]))
    return found


@pytest.fixture(scope="module")
def helps():
    """Every named script's --help, the scripts run at once (each loads TensorFlow)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    scripts = sorted({s for s, _ in script_commands() if os.path.isfile(os.path.join(ROOT, s))})
    procs = {s: subprocess.Popen([sys.executable, os.path.join(ROOT, s), "--help"], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True) for s in scripts}
    return {s: p.communicate(timeout=120)[0] for s, p in procs.items()}


def test_readme_commands_name_scripts_and_options_that_exist(helps):
    commands = script_commands()
    assert {"train.py", "prepare.py", "generate.py", "evaluate.py"} <= {s for s, _ in commands}
    for script, words in commands:
        assert script in helps, f"README runs {script}, which does not exist"
        for i, word in enumerate(words):
            option = word.split("=")[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", option):
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[script]), \
                    f"README: {script} {option} is not in its --help"
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        config_path = words[words.index("--config") + 1] if "--config" in words else None
        try:  # the --config file exists and every --set key is known and takes its value
            config.load(config_path and os.path.join(ROOT, config_path), sets)
        except config.ConfigError as e:
            pytest.fail(f"README: {script} {' '.join(words)}: {e}")


def test_readme_set_up_commands_work_as_written():
    requirements = read(os.path.join(ROOT, "requirements.txt"))
    pins = dict(re.findall(r"^([\w-]+)(==\S+)", requirements, re.M))
    commands = [shlex.split(c) for c in readme_commands()]
    for words in commands:
        if words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2]), f"README: no module {words[2]}"
        elif words[0] == "pip":
            for word in words[2:]:
                if word == "-r":
                    continue
                if word.endswith(".txt"):
                    assert os.path.isfile(os.path.join(ROOT, word)), f"README: no {word}"
                else:  # pinned like requirements.txt
                    name, _, pin = re.match(r"([\w-]+)(\[[\w-]+\])?(==\S+)", word).groups()
                    assert pins.get(name) == pin, f"README installs {word}, requirements.txt {name}{pins.get(name)}"
        elif words[0] == "tensorboard":  # the README's way to watch a run
            assert "tensorboard" in pins and importlib.util.find_spec("tensorboard")
    assert any(w[0] == "tensorboard" for w in commands)


def run_folder_table():
    """The file column of the README's table under "What a run prints and writes"."""
    section = read(README).split("## What a run prints and writes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])]


def as_regex(name):
    """samples/step-NNNNNN.png, checkpoints/model-N.*, tensorboard/ -> a regex of paths."""
    body = re.escape(name.rstrip("/")).replace("NNNNNN", r"\d{6}").replace("N", r"\d+")
    return re.compile(body.replace(r"\*", "[^/]*") + ("(/.+)?" if name.endswith("/") else ""))


def test_the_run_folder_table_names_every_file_a_run_writes(smoke_run):
    names = run_folder_table()
    assert "config.json" in names and "log.jsonl" in names
    written = [os.path.relpath(os.path.join(d, f), smoke_run).replace(os.sep, "/")
               for d, _, files in os.walk(smoke_run) for f in files]
    patterns = {name: as_regex(name) for name in names}
    for path in written:
        assert any(p.fullmatch(path) for p in patterns.values()), \
            f"a run writes {path}; the README's run-folder table does not name it"
    for name, p in patterns.items():
        if name not in NOT_IN_A_PLAIN_RUN:
            assert any(p.fullmatch(path) for path in written), \
                f"the README's run-folder table names {name}; a run does not write it"


def defined_names(path):
    """Top-level functions, classes and assignments of a module, and Class.method names."""
    names = set()
    for node in ast.parse(read(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body
                          if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("doc", [README] + DOCS, ids=os.path.basename)
def test_code_and_test_references_exist(doc):
    text = read(doc)
    for module, name in CODE_REF.findall(text):
        path = os.path.join(ROOT, module)
        assert os.path.isfile(path), f"{os.path.basename(doc)} names {module}:{name}; no {module}"
        assert name in defined_names(path), f"{os.path.basename(doc)} names {module}:{name}; " \
                                            f"{module} defines no {name}"
    for module, name in TEST_REF.findall(text):
        path = os.path.join(ROOT, "tests", module)
        assert os.path.isfile(path) and name in defined_names(path), \
            f"{os.path.basename(doc)} names {module}::{name}, which does not exist"


@pytest.mark.parametrize("doc", [README] + DOCS, ids=os.path.basename)
def test_relative_links_and_images_resolve(doc):
    for groups in LINK.findall(read(doc)):
        target = (groups[0] or groups[1]).split("#")[0]
        if not target or re.match(r"[a-z]+:", target):  # a web address or an anchor
            continue
        assert os.path.exists(os.path.join(os.path.dirname(doc), target)), \
            f"{os.path.basename(doc)} links {target}, which does not exist"


def test_docs_hold_what_the_readme_points_to():
    assert len(read(README).splitlines()) <= 250
    for name in ("performance", "quality", "guarantees", "lessons", "model"):
        assert os.path.join(ROOT, "docs", name + ".md") in DOCS
    lessons = read(os.path.join(ROOT, "docs", "lessons.md"))
    rows = re.findall(r"^\| (\d+) \|", lessons, re.M)
    assert rows == [str(n) for n in range(1, 40)]  # every lesson has its row
