"""Imports run one way: store <- models <- methods <- engine <- sweep/cli, and the analysis needs the store only.
Checked by importing each layer in a fresh interpreter where the layers above it (and, for the store and the
analysis, torch) cannot be imported."""
import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent('''
    import sys
    BLOCKED = {blocked!r}
    class Block:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"layer violation: {{name}} imported")
    sys.meta_path.insert(0, Block())
    import {modules}
    print("ok")
''')

B = "hkdbench.benchmark"
ABOVE_MODELS = [f"{B}.engine", f"{B}.probes", f"{B}.sweep", f"{B}.cli", f"{B}.commands", f"{B}.demo"]
LAYERS = [
    # (what is imported, what it must not need)
    ([f"{B}.store", f"{B}.config"], ["torch", "timm", "hkdbench.methods", f"{B}.models", *ABOVE_MODELS]),
    (["hkdbench.analysis.collect", "hkdbench.analysis.tables", "hkdbench.analysis.report"],
     ["torch", "timm", "submitit", "hkdbench.methods", f"{B}.models", f"{B}.data", f"{B}.recipes", *ABOVE_MODELS]),
    ([f"{B}.models.zoo", f"{B}.models.taps"], ["hkdbench.methods", *ABOVE_MODELS]),
    (["hkdbench.methods"], ABOVE_MODELS),
    ([f"{B}.engine.trainer", f"{B}.probes.hooks"], [f"{B}.sweep", f"{B}.cli", f"{B}.commands"]),
]


@pytest.mark.parametrize("modules,blocked", LAYERS, ids=[m[0] for m, _ in LAYERS])
def test_a_layer_imports_nothing_above_it(modules, blocked):
    code = BLOCKER.format(blocked=blocked, modules=", ".join(modules))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_check_itself_catches_a_violation():
    code = BLOCKER.format(blocked=[f"{B}.models"], modules=f"{B}.engine.trainer")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "layer violation" in out.stderr
