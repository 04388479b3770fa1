"""Training orchestration: a run built once and looped over, above the infrastructure of
:mod:`hmkd.engine` and the methods of :mod:`hmkd.distill`.

- :mod:`~hmkd.training.trainer`: :func:`~hmkd.training.trainer.train`, an iteration-based run (resume,
  checkpoints, logs, periodic evaluation);
- :mod:`~hmkd.training.step`: :func:`~hmkd.training.step.train_step`, one optimisation step (the
  trainer's, and what ``hmkd bench cost`` times);
- :mod:`~hmkd.training.pretrain`: the pretrained backbone stand-in (``backbone_weights: pretrain``).
"""
