"""The CLI frame: every subcommand has a --help that explains it; `python -m pipeline` is the same CLI."""
import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS, main


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_every_subcommand_explains_itself(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    description = next(c[2] for c in COMMANDS if c[0] == name)
    assert description.split()[0] in text and "usage: mmclip " + name in text


def test_python_m_pipeline_is_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name, *_ in COMMANDS)
