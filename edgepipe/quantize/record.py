"""What a shipped INT8 file records about itself: the backend and session settings it was
measured on, the budget it was judged against and its verdict on each backend that ran the same
file (read back by edgepipe.runtime.deployment.MeasuredOn, so the runtime runs it where it was
judged and refuses a backend where it is out of budget)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from edgepipe.quantize.verdict import OUT_OF_BUDGET, PENDING
from edgepipe.runtime.deployment import DEPLOYMENT_KEY

if TYPE_CHECKING:
    from edgepipe.quantize.candidate import Candidate
    from edgepipe.quantize.search import Search


def deployment_record(search: Search, chosen: Candidate) -> dict:
    """What the shipped file records about itself (runtime.deployment.MeasuredOn reads it): the
    backend and per-batch session settings it was measured on, the budget, and its verdict on
    every backend that ran the same file, so that a runtime refuses one where it is out of budget."""
    config = search.config
    backends = {}
    for cand in search.candidates:
        if cand.recipe.file_twin != chosen.recipe.file_twin or cand.verdict.kind == PENDING:
            continue
        backends[cand.recipe.backend] = {
            "within_budget": cand is chosen or cand.verdict.kind not in OUT_OF_BUDGET,
            "verdict": str(cand.verdict), "accuracy_drop": cand.accuracy_drop,
            "speedup": {str(b): round(v, 3) for b, v in cand.speedup.items()}}
    return {"backend": chosen.recipe.backend, "device": config.device, "recipe": chosen.recipe.name,
            "sessions": {str(b): s.to_dict() for b, s in chosen.settings.items()},
            "budget": {"max_accuracy_drop": config.max_accuracy_drop, "min_speedup": config.min_speedup},
            "backends": backends}


def deployment_metadata(search: Search, chosen: Candidate) -> dict[str, str]:
    """The metadata_props entry that carries `deployment_record`."""
    return {DEPLOYMENT_KEY: json.dumps(deployment_record(search, chosen))}
