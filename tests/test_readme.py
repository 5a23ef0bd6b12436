"""The README's promises that CI relies on."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("```bash") + 1
    return lines[start:lines.index("```", start)]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    """If this fails, the README's test command and what CI runs have drifted apart."""
    commands = _readme_commands()
    assert len(commands) == 2
    assert "maskrcnn-train --config=shapes" in commands[0]
    assert commands[1] in (REPO / ".ci" / "run").read_text().splitlines()
