"""`python -m pipeline` is the same CLI as `mmclip`."""
from pipeline.cli import run_and_exit

run_and_exit()
