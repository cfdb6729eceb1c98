"""Score: RunInference over snapshots (`model_handler`) and the anomaly flags (`anomalies`)."""
