"""A small app that embeds the edgepipe runtime with only the base install (numpy +
onnxruntime): classify 8x8 digit images with the model a pipeline run deployed, from several
threads at once, as a web handler or a worker pool would.

    edgepipe demo                        # or any run with a cnn/mlp model on digits
    python examples/embed_app.py runs/demo cnn images.npz   # images.npz: x (N, 1, 8, 8) float32
    python examples/embed_app.py runs/demo cnn               # no file: random images
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgepipe.errors import EdgepipeError
from edgepipe.runtime import Engine


def classify(engine: Engine, images: np.ndarray, workers: int = 4) -> np.ndarray:
    """Predicted class per image; requests of 8 images run concurrently on one Engine."""
    chunks = [images[i:i + 8] for i in range(0, len(images), 8)]
    with ThreadPoolExecutor(workers) as pool:
        logits = list(pool.map(lambda x: engine.run(x)[engine.output_names[0]], chunks))
    return np.concatenate(logits).argmax(-1)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    run_dir, model = argv[0], argv[1]
    try:
        engine = Engine.from_run(run_dir, model)
        if len(argv) > 2:
            images = np.load(argv[2], allow_pickle=False)["x"].astype(np.float32)
        else:
            images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
        predictions = classify(engine, images)
    except EdgepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{engine.run_info['artifact']} on {engine.providers[0]}: {len(predictions)} images -> "
          f"classes {np.bincount(predictions, minlength=10).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
