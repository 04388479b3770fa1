"""Training orchestration: a run built once and looped over, above the infrastructure of
:mod:`hmkd.engine` and the methods of :mod:`hmkd.distill`.

- :mod:`~hmkd.training.run`: :func:`train` (a run from a config) and the pretrained stand-ins it makes
  on first use (:func:`ensure_pretrained`, :func:`resolve_pretrained`);
- :mod:`~hmkd.training.trainer`: :class:`~hmkd.training.trainer.Trainer`, the run itself (checks and
  data, what it trains built by :func:`hmkd.distill.build.build_run`, resume state, the loop,
  periodic and final evaluation, the files it writes);
- :mod:`~hmkd.training.step`: :func:`~hmkd.training.step.train_step`, one optimisation step (the
  trainer's, and what ``hmkd bench cost`` times);
- :mod:`~hmkd.training.pretrain`: the stand-in's settings, cache key and folder.
"""

from hmkd.training.run import ensure_pretrained, resolve_pretrained, train
from hmkd.training.trainer import TrainingInterrupted, resolve_output_dir

__all__ = ["TrainingInterrupted", "ensure_pretrained", "resolve_output_dir", "resolve_pretrained", "train"]
