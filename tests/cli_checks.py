"""What the fault tests assert of a refused command: one line, no traceback."""

from __future__ import annotations

from wfcore import cli


def fails(capsys, *argv: str, code: int = 2) -> str:
    """Run the CLI; it must exit non-zero with one line on stderr and no traceback."""
    capsys.readouterr()
    assert cli.main(["-q", *argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wfcore: error: "), err
    return lines[0]
