"""Train-time gradient collection: per-example rows written while a model trains.

``TrainTimeCollector`` works in any training loop (a Ray Train worker's included);
``GradientCollectorCallback`` and ``prepare_trainer`` fit it to an HF ``Trainer``.
"""

from rayattr.train.callback import GradientCollectorCallback, prepare_trainer
from rayattr.train.collector import TrainTimeCollector
from rayattr.store import ORDER

__all__ = ["ORDER", "GradientCollectorCallback", "TrainTimeCollector", "prepare_trainer"]
