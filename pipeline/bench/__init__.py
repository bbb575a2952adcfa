"""Benchmarks (`mmclip bench loss|data|train|quality`): every speed, memory and quality claim the README makes.

Each module measures one area side by side with a reference (open_clip's loss, loader or trainer; the
symile package) in fresh subprocesses and writes markdown/JSON tables and PNG plots under docs/bench.
This package owns its synthetic inputs (`realistic_data`) and the optional packages it compares against
(`pip install mmclip[bench]`); the product modules (data, models, losses, train, eval, export, launch)
import nothing from it.
"""
