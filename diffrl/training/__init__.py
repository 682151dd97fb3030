"""The training engine every algorithm in :mod:`diffrl.trainers` runs on: the typed trainer contract
(:mod:`~diffrl.training.protocol`), the run loop (:mod:`~diffrl.training.engine`), run set-up, the one
accumulate-and-step path (:mod:`~diffrl.training.step_guard`), seeding, checkpoints, and the pieces the
online trainers share (rollouts, reward pipeline, evaluation, weight EMA, sharding)."""
