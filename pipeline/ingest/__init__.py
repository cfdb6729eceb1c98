"""Ingest: from a source to valid keyed chunks of examples, and dead letters for the rest.

`read.ReadExamples` is the one read path of the training and the scoring job: a data set
replayed as a stream (`replay`, `scenarios`, `datasets`), files read once or watched, or
Kafka messages (`sources`), decoded (`decode`) and validated (`validation`) into
`read.KeyedChunk`s, with every rejected record a `dead_letter.DeadLetter`. `keys` says which
model keys are valid; `lifecycle` carries a job's stop request to its sources.
"""
