"""Everything that moves data, in stage packages that follow the flow of the training job.

    ingest/    source -> decode and validate -> valid keyed chunks + dead letters
    train/     key + minibatch -> test-then-train per model key -> training records;
               drift detection, checkpoints, snapshots and progress of each key
    score/     valid chunks -> RunInference on snapshots -> scores and anomaly flags
    outputs/   what consumes records and rejects: Prometheus metrics, dead-letter and
               score files, figures
    jobs/      the flags (Beam PipelineOptions) and the train / score / produce jobs
    cli/       the `aevb` command

A module imports only from its own stage or earlier ones in this list (`train` and `score`
are two branches after `ingest`; neither imports the other), and nothing imports `cli`.
`vae` (the model and its learning algorithm) is below all of them.
"""
