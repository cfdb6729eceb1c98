"""Jobs: the flags (`options`, a Beam `PipelineOptions` subclass) and the Beam jobs built from
them: `train` (ingest -> train -> outputs), `score` (ingest -> score -> outputs) and
`produce` (a data set replayed into Kafka).
"""
