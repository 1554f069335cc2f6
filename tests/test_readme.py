"""Every `defectscope` command in the README's code blocks exists, and every option it uses is one of that command's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from defectscope.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[list[str]]:
    """The words of each `defectscope ...` line in the README's bash code blocks (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and Path(words[0]).name == "defectscope":
                commands.append(words[1:])
    return commands


def test_every_readme_command_exists_with_its_options() -> None:
    commands = _readme_commands()
    assert len(commands) >= 25  # the README's walk-through, not a stray example
    root = typer.main.get_command(app)
    for words in commands:
        command, rest = root, list(words)
        while hasattr(command, "commands") and rest and rest[0] in command.commands:
            command = command.commands[rest.pop(0)]
        assert not hasattr(command, "commands"), f"README: 'defectscope {' '.join(words)}' names no command"
        known = {name for parameter in command.params for name in parameter.opts + parameter.secondary_opts}
        used = {word.split("=")[0] for word in rest if word.startswith("-")}
        assert used <= known, f"README: 'defectscope {' '.join(words)}' uses {sorted(used - known)}"
        command.make_context(command.name, [w for w in rest if not w.startswith("[")], resilient_parsing=True)


def test_every_section_the_readme_points_to_exists() -> None:
    """`see "X"` (and `"X" below`) must name a heading of the README, or the bold lead-in of one of its paragraphs."""
    text = README.read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # comments in code blocks are not headings
    headings = [line.lstrip("#").strip() for line in prose.splitlines() if line.startswith("#")]
    lead_ins = re.findall(r"^\*\*([^*]+?)\.?\*\*", prose, flags=re.M)
    pointers = re.findall(r'see "([^"]+)"', prose) + re.findall(r'"([^"]+)" below', prose)
    assert pointers
    missing = [p for p in pointers if not any(h.startswith(p) for h in headings + lead_ins)]
    assert not missing, f"the README points to sections it does not have: {missing}"
