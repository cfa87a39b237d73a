"""The docs' command lines run: every ``train.py``/``study.py`` line with ``--print_config`` or ``--help``.

A renamed key or option then fails here instead of in a reader's terminal. The lines are read from the code
blocks of README.md, docs/ and the study write-ups, exactly as shown (``.venv/bin/python`` -> this Python,
comments and line continuations handled), and run in one Python process to spare a start-up each.
"""

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *(ROOT / "studies" / "results").glob("*/README.md"),
]
SCRIPTS = ("train.py", "study.py")
ASKS = re.compile(r"(^|\s)(--print_config|--help|-h|--[\w.]+\.help)(\s|=|$)")

#: runs each argv as ``python SCRIPT ...`` would, in this process; prints one JSON line per command
RUNNER = """
import json, runpy, sys, io, contextlib
import lit_nas
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except Exception as err:  # reported, not raised: the other commands still run
        code = repr(err)
    print(json.dumps({"argv": argv, "code": code, "printed": len(out.getvalue())}), file=sys.__stdout__)
"""


def code_lines(text: str) -> list[str]:
    """The shell lines of the fenced code blocks, continuations joined and comments dropped."""
    lines, block, fence = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            block.append(line)
    joined = "\n".join(block).replace("\\\n", " ")
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a trailing comment
        if line:
            lines.append(line)
    return lines


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(page, argv)`` of every documented train.py/study.py line that asks for help or the config."""
    found = []
    for page in PAGES:
        for line in code_lines(page.read_text()):
            if not any(script in line for script in SCRIPTS) or not ASKS.search(line):
                continue
            words = shlex.split(line)
            script = next((i for i, w in enumerate(words) if w in SCRIPTS), None)
            if script is None or "|" in words or ">" in words:
                continue
            found.append((str(page.relative_to(ROOT)), [str(ROOT / words[script]), *words[script + 1 :]]))
    return found


def test_the_docs_show_commands_to_run():
    commands = documented_commands()
    assert len(commands) >= 4, commands
    assert {Path(argv[0]).name for _, argv in commands} == set(SCRIPTS)


def run_all(argvs: list[list[str]], home: Path) -> tuple[list[dict], str]:
    """Each ``argv`` run by :data:`RUNNER` in one fresh process; its results and stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(argvs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "HOME": str(home)},
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], proc.stderr


def test_every_documented_help_and_print_config_line_runs(tmp_path):
    commands = documented_commands()
    results, stderr = run_all([argv for _, argv in commands], tmp_path)
    assert len(results) == len(commands), stderr[-3000:]
    bad = [
        (page, " ".join(r["argv"][1:]), r["code"])
        for (page, _), r in zip(commands, results, strict=True)
        if r["code"] != 0 or r["printed"] == 0
    ]
    assert not bad, f"documented commands that fail: {bad}\n{stderr[-3000:]}"


def test_a_renamed_key_would_fail(tmp_path):
    # negative control: the same runner reports a key that does not exist
    argv = [
        str(ROOT / "train.py"),
        "fit",
        "--config",
        "quickstart.yaml",
        "--snip.no_such_key",
        "1",
        "--print_config",
    ]
    (result,), _ = run_all([argv], tmp_path)
    assert result["code"] != 0


#: a dotted name of the code in backticks (`lit_nas.snip.PruneSchedule`, `callbacks.SnipPruning`)
NAME = re.compile(r"`((?:lit_nas_study|lit_nas_cli|lit_nas|callbacks|device_bench)(?:\.[A-Za-z_]\w*)+)")
#: what ends a file's name, not an attribute's (`device_bench.json`, `lit_nas_cli.py`)
FILE_SUFFIXES = (".json", ".py", ".yaml", ".pt", ".png", ".md")


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute of one (a module that needs another environment, such
    as the TensorFlow side of the export, counts when its file exists)."""
    if name.endswith(FILE_SUFFIXES):
        return True
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue  # not a module: try a shorter prefix
            return (ROOT / f"{module.replace('.', '/')}.py").is_file()  # it needs what this env lacks
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_name_of_the_code_the_docs_mention_exists():
    names = {m.group(1) for page in PAGES for m in NAME.finditer(page.read_text())}
    assert len(names) > 30  # the pattern finds them (42 when written)
    assert not sorted(n for n in names if not resolves(n))


def test_a_renamed_name_would_fail():
    assert resolves("lit_nas.snip.PruneSchedule") and resolves("callbacks.SnipPruning")
    assert not resolves("lit_nas.pruning.PruneSchedule") and not resolves("lit_nas.snip.NoSuchThing")


#: the YAML files a run writes (named in the docs, not shipped)
RUN_FILES = {"found_arch.yaml", "lit_nas_config.yaml"}


def test_every_config_the_docs_name_is_shipped():
    named = {m.group(1) for page in PAGES for m in re.finditer(r"`([\w./-]+\.yaml)`", page.read_text())}
    where = (ROOT / "configs", ROOT / "studies", ROOT / "tests" / "configs")
    missing = sorted(
        n
        for n in named - RUN_FILES
        if not ((ROOT / n).is_file() if "/" in n else any((d / n).is_file() for d in where))
    )
    assert len(named) > 20 and not missing
