"""`crossgrad.evaluate`: test accuracy of a simulator's agents and of their consensus model, from Python."""
from __future__ import annotations

from typing import Any

import torch

from crossgrad.data.datasets import Dataset
from crossgrad.data.streams import normalized


@torch.no_grad()
def evaluate(sim: Any, test: Dataset, batch_size: int = 1024) -> dict[str, Any]:
    """Accuracy of every agent's model and of the consensus (the average of all agents' parameters).

    Returns consensus_acc, consensus_loss, local_acc (one per agent), local_acc_mean/min/max and
    consensus_distance, accuracies as fractions: the runner's metrics, for a `crossgrad.Simulator`.
    """
    from crossgrad.run.evaluate import accuracy_record, consensus_buffers, score_models, score_rows

    e = sim.engine
    models = e.models()  # push-sum's de-biased x / w, else the rows x themselves
    x, y = normalized(test).to(e.x.device), test.y.long().to(e.x.device)
    correct, _ = score_models(sim.model, e.layout, models, e.buffers, x, y, batch_size)
    centre = models.mean(0, keepdim=True)
    c_correct, c_loss = score_rows(sim.model, e.layout, centre, consensus_buffers(e.buffers), x, y, batch_size)
    out = accuracy_record(torch.cat([correct, c_correct]).cpu(), float(c_loss[0]), len(y))
    out["consensus_distance"] = sim.consensus_distance()
    return out
