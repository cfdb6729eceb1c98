"""Train: one model per key, test-then-train, and what each key keeps on disk.

`trainer.TrainVAE` keys valid chunks and cuts them into minibatches in a stateful DoFn; per
key a `session.TrainingSession` scores each minibatch before it learns from it, emits a
`records.TrainingRecord`, watches the bound for drift (`drift`), adapts its optimiser on a
drift (`adaptation`), and writes the key's checkpoints (`checkpoints`), versioned snapshots
(`snapshots`) and progress lines (`progress`). Observers (`observers.SessionObserver`) hear
of every record, snapshot and drift: that is how later stages (metrics) follow a session.
"""
