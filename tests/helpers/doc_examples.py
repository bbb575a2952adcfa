"""Code blocks of the docs, imported from the docs' own text: what a user copies is what the tests run."""
import re
import sys
import types

from helpers.paths import ROOT

EXTENDING = ROOT / "docs" / "extending.md"


def code_block(doc_text: str, heading: str) -> str:
    """The first ```python block under the markdown heading that starts with `heading`."""
    section = doc_text[doc_text.index(f"\n{heading}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def import_loss_example() -> types.ModuleType:
    """docs/extending.md's "Add a loss" example as a module (it registers `tempered_clip`), once per process."""
    name = "extending_loss_example"
    if name not in sys.modules:
        module = types.ModuleType(name)
        exec(compile(code_block(EXTENDING.read_text(), "## Add a loss"), str(EXTENDING), "exec"), module.__dict__)
        sys.modules[name] = module
    return sys.modules[name]
