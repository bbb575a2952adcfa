"""pipeline/ uses only public names of the libraries it builds on: private ones (`_x`) change without notice
between releases. Checked statically with `ast` over every source file."""
import ast

import pytest

from helpers.paths import ROOT

LIBRARIES = {"open_clip", "timm", "transformers", "deepspeed", "webdataset"}
PACKAGE = ROOT / "pipeline"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """`lib._x` imports and attribute accesses (also through private modules, aliases and imported submodules),
    as "line: dotted name"."""
    tree = ast.parse(source)
    found, bound = [], {}  # bound: a local name -> the library path it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    local = alias.asname or alias.name.split(".")[0]  # `import a.b` binds a, `import a.b as x` a.b
                    bound[local] = alias.name if alias.asname else local
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"{node.lineno}: {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in LIBRARIES:
            for alias in node.names:
                path = f"{node.module}.{alias.name}"
                bound[alias.asname or alias.name] = path
                if any(_private(part) for part in path.split(".")):
                    found.append(f"{node.lineno}: {path}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base, chain = node.value, [node.attr]
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"{node.lineno}: {'.'.join([bound[base.id], *chain])}")
    return found


@pytest.mark.parametrize("snippet, named", [
    ("from open_clip.model import CLIPVisionCfg, _build_vision_tower", "open_clip.model._build_vision_tower"),
    ("from timm.layers._fx import register_notrace_module", "timm.layers._fx.register_notrace_module"),
    ("import transformers._internal", "transformers._internal"),
    ("import open_clip\nopen_clip.model._build_text_tower(8, cfg)", "open_clip.model._build_text_tower"),
    ("import webdataset as wds\nwds._private()", "webdataset._private"),
    ("from deepspeed import comm\ncomm._state", "deepspeed.comm._state"),
    ("def f():\n    from transformers.models.clip import modeling_clip as m\n    return m._helper",
     "transformers.models.clip.modeling_clip._helper"),
])
def test_the_scan_finds_private_names(snippet, named):
    assert [use.split(": ")[1] for use in private_uses(snippet)] == [named]


def test_the_scan_leaves_public_names_and_other_libraries_alone():
    snippet = ("import open_clip, torch\nfrom transformers import CLIPModel\nopen_clip.__version__\n"
               "torch._C\nself._cache\nCLIPModel.from_pretrained\nfrom ._local import _x\n")
    assert private_uses(snippet) == []


def test_pipeline_uses_no_private_names_of_its_libraries():
    found = {str(path.relative_to(PACKAGE.parent)): private_uses(path.read_text())
             for path in sorted(PACKAGE.rglob("*.py"))}
    assert {path: uses for path, uses in found.items() if uses} == {}
