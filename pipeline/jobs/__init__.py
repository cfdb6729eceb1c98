"""Jobs: the flags (`options`) and the Beam jobs built from them.

`train` (ingest -> train -> outputs), `score` (ingest -> score -> outputs) and `produce` (a
data set replayed into Kafka); a job holds its run directory's lock (`run_lock`).
"""
