"""Training: ``loop.train(cfg)`` and the rooms it uses.

setup (accelerator, data, model + method, optimizer, schedule, resume) -> step (one optimizer
step: ``step.train_step``) -> validation + state (periodic evaluation, early stopping) ->
checkpoint -> finalize (best weights, test, adapter + manifest, publish). Around it:
param_groups / schedules / unfreezing (what the optimizer sees), crossval, ladder, retrain,
tracking (MLflow), batch_trace, report.
"""
