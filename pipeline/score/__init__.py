"""Score: RunInference over snapshots, one model or a model per key (`model_handler`), and the
anomaly flags (`anomalies`)."""
