"""Accuracy: hand-made logits with known top-1 / top-5, the registry build, and the cross-rank sum."""
from __future__ import annotations

import pytest
import torch

from hat.engine import distributed
from hat.evaluation import Accuracy
from hat.registry import build

# Six classes; each row ranks the classes by its logits, the label's rank is in the comment.
LOGITS = torch.tensor([[9.0, 1, 2, 3, 4, 5],    # label 0: rank 1
                       [1.0, 9, 8, 7, 6, 5],    # label 3: rank 3
                       [1.0, 2, 3, 4, 5, 6],    # label 0: rank 6 (last)
                       [6.0, 5, 4, 3, 2, 1]])   # label 4: rank 5
LABELS = torch.tensor([0, 3, 0, 4])


def test_top1_and_top5_of_hand_logits():
    acc = Accuracy(topk=5)
    acc.update(LOGITS[:2], LABELS[:2])
    acc.update(LOGITS[2:], LABELS[2:])
    assert acc.compute() == {"val/top1": 25.0, "val/top5": 75.0}
    assert acc.main_metric == "val/top1"


def test_top1_only_by_default_and_no_top5_of_fewer_classes():
    acc = Accuracy()
    acc.update(LOGITS, LABELS)
    assert acc.compute() == {"val/top1": 25.0}
    few = Accuracy(topk=5)
    few.update(torch.tensor([[0.0, 1, 2], [2.0, 1, 0]]), torch.tensor([2, 1]))
    assert few.compute() == {"val/top1": 50.0}


def test_reset_and_bad_input():
    acc = Accuracy()
    acc.update(LOGITS, LABELS)
    acc.reset()
    acc.update(LOGITS[:1], LABELS[:1])
    assert acc.compute() == {"val/top1": 100.0}
    with pytest.raises(ValueError, match=r"logits \[B, K\] and labels \[B\]"):
        acc.update(LOGITS, LABELS[:3])
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        Accuracy(topk=0)


def test_sums_over_ranks(monkeypatch):
    """Under a process group compute() adds the other ranks' counts (here a fake rank with 4 hits of 4)."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda values: [v + o for v, o in zip(values, [4, 4, 4, 0])])
    acc = Accuracy(topk=5)
    acc.update(LOGITS, LABELS)
    assert acc.compute() == {"val/top1": 62.5, "val/top5": 87.5}


def test_built_from_a_config():
    acc = build({"type": "Accuracy", "topk": 5}, "evaluator", kind="evaluator")
    assert isinstance(acc, Accuracy) and acc.topk == 5
