"""Every command in the README's ```bash blocks exists as written: each `aploss` invocation names
a command of the CLI with that command's options, its `section.key=value` overrides make a valid
config (with its `--config` file), and each `python -m jobs.<name>` names a job module. Fast: the
CLI's parser and the config schema only, no Ray, MLflow or training."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.orchestration import cli

PROJECT = Path(__file__).resolve().parents[1]
README = PROJECT / "README.md"
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_JOB = re.compile(r"(?:^|\s)-m\s+jobs\.(\w+)")
# What a reader would have to fill in before running the line.
_PLACEHOLDERS = ("<", ">", "…", "...")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def command_lines(block: str) -> list[str]:
    """The block's lines, backslash continuations joined, blank and comment lines left out."""
    joined = re.sub(r"\\\n", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def simple_commands(line: str) -> list[list[str]]:
    """The line's simple commands (split at `&&`, `||`, `;`, `|` and parentheses), each without
    its leading `NAME=value` environment assignments."""
    commands, current = [], []
    for word in _words(line) + [";"]:
        if word and set(word) <= set("&|;()"):
            while current and _ASSIGNMENT.match(current[0]):
                current.pop(0)
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def config_problem(overrides: list[str], config_file: str | None = None) -> str | None:
    """Why `overrides` (on `config_file`, relative to the project) make no valid config, or None."""
    placeholders = [item for item in overrides if any(mark in item for mark in _PLACEHOLDERS)]
    if placeholders:
        return f"placeholders in {placeholders}: write a real example value"
    try:
        load_config(PROJECT / config_file if config_file else None, overrides)
    except UserError as error:
        return str(error)
    return None


def aploss_problems(arguments: list[str]) -> list[str]:
    """What is wrong with `aploss ARGUMENTS` as written: an unknown command or option, a
    placeholder, or overrides that name no config key or make no valid config."""
    root, parsers = cli.parser()
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages), contextlib.redirect_stdout(io.StringIO()):
            parsed, unknown = root.parse_known_args(arguments)
    except SystemExit:
        return [f"does not parse: {messages.getvalue().strip()}"]
    command = " ".join(filter(None, [parsed.command, getattr(parsed, "action", None)]))
    problems = []
    # Each option as written, not an abbreviation that argparse would also take.
    options = set(root._option_string_actions) | set(parsers[command]._option_string_actions)
    for word in arguments:
        if word.startswith("-") and word.split("=", 1)[0] not in options:
            problems.append(f"{word.split('=', 1)[0]} is not an option of 'aploss {command}'")
    overrides = list(parsed.overrides)
    if command == "predict":  # the images and the overrides share the positional arguments
        overrides += [item for item in unknown if not item.startswith("-")]
        images = [item for item in overrides if not cli._OVERRIDE.match(item)]
        overrides = [item for item in overrides if cli._OVERRIDE.match(item)]
        problems += [f"placeholder {item!r}" for item in images if any(mark in item for mark in _PLACEHOLDERS)]
    elif unknown:
        problems.append(f"unrecognized arguments of 'aploss {command}': {unknown}")
    if getattr(parsed, "samples", None) is not None:
        overrides.append(f"tune.samples={parsed.samples}")
    for value in (getattr(parsed, "model", None), getattr(parsed, "out", None), parsed.config):
        if value and any(mark in value for mark in _PLACEHOLDERS):
            problems.append(f"placeholder {value!r}")
    if parsed.config and not (PROJECT / parsed.config).is_file():
        problems.append(f"--config {parsed.config}: no such file in the project")
    elif problem := config_problem(overrides, parsed.config):
        problems.append(problem)
    return problems


def job_problems(words: list[str]) -> list[str]:
    """`python -m jobs.NAME [--config FILE] [overrides]`: NAME is a job module, its overrides valid."""
    problems = []
    for index, word in enumerate(words[:-1]):
        if word == "-m" and words[index + 1].startswith("jobs."):
            name = words[index + 1].removeprefix("jobs.")
            if not (PROJECT / "jobs" / f"{name}.py").is_file():
                problems.append(f"jobs.{name}: no such module under jobs/")
            rest = words[index + 2:]
            overrides = [item for item in rest if cli._OVERRIDE.match(item)]
            config = rest[rest.index("--config") + 1] if "--config" in rest[:-1] else None
            if name not in ("submit", "runtime_env") and (problem := config_problem(overrides, config)):
                problems.append(problem)
    return problems


def line_problems(line: str) -> list[str]:
    """What is wrong with the commands of one README line (aploss invocations and job modules)."""
    problems = []
    for words in simple_commands(line):
        if Path(words[0]).name == "aploss":
            problems += aploss_problems(words[1:])
        problems += job_problems(words)
    # `-m jobs.X` inside "$(...)" is one quoted word above: look for the module names as well.
    for name in _JOB.findall(line):
        if not (PROJECT / "jobs" / f"{name}.py").is_file():
            problems.append(f"jobs.{name}: no such module under jobs/")
    return sorted(set(problems))


def readme_lines() -> list[str]:
    return [line for block in bash_blocks(README.read_text()) for line in command_lines(block)]


def _invokes_aploss(line: str) -> bool:
    return any(Path(words[0]).name == "aploss" for words in simple_commands(line))


def test_the_readme_has_commands_to_check():
    lines = readme_lines()
    assert sum(map(_invokes_aploss, lines)) >= 10
    assert any(_JOB.search(line) for line in lines)


@pytest.mark.parametrize("line", [line for line in readme_lines() if _invokes_aploss(line) or _JOB.search(line)])
def test_every_readme_command_exists_as_written(line):
    assert line_problems(line) == []


def test_the_checker_finds_what_is_wrong():
    assert "unknown key" in config_problem(["train.no_such_key=1"])
    assert config_problem(["train.epochs=2"]) is None
    assert line_problems("aploss train train.epochs=2 run.name=quick") == []
    for wrong in ("aploss train train.no_such_key=1", "aploss trian", "aploss pipeline go",
                  "aploss predict --modle default photos/", "aploss tune --sample 8",
                  "aploss eval run.name=<NAME>", "aploss predict --model default photos/ model.score_thresh=…",
                  "APLOSS_DATA_ROOT=data .venv/bin/aploss pipeline run optim.lr=-1",
                  "python3 -m venv .venv && .venv/bin/aploss config show optim.foo=1",
                  "aploss tune --config configs/no_such.yaml",
                  ".venv/bin/python -m jobs.no_such_job", "ray job submit -- python -m jobs.pipeline train.nope=1"):
        assert line_problems(wrong), wrong
