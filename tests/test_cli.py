"""`wfcore --help` and each command's --help describe everything the parser knows."""

from __future__ import annotations

import argparse
import re

import pytest

from wfcore import cli


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_every_command_has_a_handler_and_a_summary_in_wfcore_help(capsys):
    parser = cli.parser()
    commands = subcommands(parser)
    assert set(commands.choices) == set(cli.COMMANDS)
    summaries = {a.dest: a.help for a in commands._choices_actions}
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # the words, however wrapped
    for name in commands.choices:
        assert summaries.get(name), f"`wfcore {name}` has no one-line help"
        assert f"{name} {' '.join(summaries[name].split())}" in text


def test_wfcore_help_names_the_global_options_the_environment_and_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--quiet", "--verbose", "--disable", "--version"):
        assert option in text
    for variable in ("WFCORE_DISABLE", "WFCORE_CACHE", "TQDM_DISABLE", "NM_DISABLE_ANALYTICS",
                     "RANK", "WORLD_SIZE"):
        assert re.search(rf"^  .*\b{variable}\b", text, re.M), variable
    examples = text[text.index("examples:"):]
    for name in cli.COMMANDS:
        assert f"wfcore {name}" in examples, f"no example of `wfcore {name}`"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_argument_of_every_command_is_described(name):
    command = subcommands(cli.parser()).choices[name]
    assert command.description, f"`wfcore {name} --help` has no description"
    for action in command._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"`wfcore {name}`: {action.dest} has no help"


def test_every_global_option_is_described():
    for action in cli.parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):  # the commands: see above
            assert action.help, f"`wfcore`: {action.dest} has no help"
