"""What several test modules share: a factory-model config a pipeline runs, waiting for a file a
subprocess writes, and a prelude that makes torch and onnx tooling unimportable in a subprocess
(a device with only numpy and onnxruntime)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np
import torch

FACTORY = textwrap.dedent("""
    import torch
    from pathlib import Path

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        model.load_state_dict(torch.load(Path(__file__).with_name("weights.pt"), weights_only=True))
        return model, ["x:float32:batch,6"], ["logits"]
""")


def factory_dir(tmp_path: Path) -> Path:
    """A user's model: a factory whose weights live in weights.pt beside it (not in the .py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "model.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((200, 6)).astype(np.float32),
             y=rng.integers(0, 3, 200))
    return tmp_path


def export_config(tmp_path: Path, atol: float = 1e-4) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(f"""
        out_dir = "run"
        stages = ["export"]
        [export]
        exporters = ["torchscript"]
        atol = {atol}
        [[models]]
        name = "mine"
        source = "model.py:build"
        dataset = "data.npz"
    """))
    return path


def wait_for(pattern: str, root: Path, deadline_s: float = 60) -> Path:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{pattern} never appeared under {root}")


# Prepended to code run with `python -c`: torch and the onnx tooling cannot be imported there.
BLOCK_HEAVY = textwrap.dedent("""
    import sys
    class _Block:
        BLOCKED = ("torch", "onnx", "onnxscript", "sklearn", "onnxruntime.quantization")
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
                raise ImportError(f"{name} is not installed on this device (blocked by test)")
            return None
    sys.meta_path.insert(0, _Block())
""")
