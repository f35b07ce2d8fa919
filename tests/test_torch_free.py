"""The scheduler, the KV manager, the planner and the page map run without torch: the planner's promise to a laptop."""

from __future__ import annotations

import subprocess
import sys

# Block torch, then import every module of the three packages (found by walking them, not listed), so that
# whatever they import, directly or not, is imported too.
CHECK = """
import importlib, importlib.abc, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: this code must not need torch")
        return None

sys.meta_path.insert(0, NoTorch())
imported = []
for package in ("kvpage.sched", "kvpage.kv", "kvpage.plan", "kvpage.dashboard"):
    module = importlib.import_module(package)
    imported.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
assert "torch" not in sys.modules
print(len(imported))
"""


def test_sched_kv_and_plan_import_with_torch_blocked() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 20  # the walk really found the packages' modules


def test_the_blocker_catches_a_torch_import() -> None:
    """The check itself can fail: a module that imports torch is caught."""
    code = CHECK.replace('for package in ("kvpage.sched", "kvpage.kv", "kvpage.plan", "kvpage.dashboard"):',
                         'for package in ("kvpage.sched", "kvpage.worker"):')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "torch is blocked" in done.stderr
