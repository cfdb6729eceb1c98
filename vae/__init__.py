"""Auto-Encoding Variational Bayes (Kingma & Welling, 2014): the model and its learning algorithm.

No Beam and no data I/O here: `pipeline` moves the data, this package learns from it. The
only files it reads and writes are its snapshots, whose format it owns
(`vae.snapshot_format`: version directories, `aevb.json`, TF Serving's warm-up requests).
Names load on first use, so `import vae.config` (flag parsing) does not import TensorFlow.
`vae.load(path)` runs a snapshot's signatures on NumPy arrays without importing TensorFlow
Probability (`vae.load_model(path)` rebuilds the trainable `vae.VAE`).

>>> import numpy as np
>>> import vae
>>> trainer = vae.Trainer(vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8))
>>> trainer.train_step(np.eye(4, dtype=np.float32)).elbo.shape
(4,)
"""

import importlib

_EXPORTS = {
    "VAEConfig": "vae.config",
    "UPDATE_CLIP_THRESHOLD": "vae.config",
    "PRECISIONS": "vae.config",
    "Evaluation": "vae.evaluation",
    "evaluate": "vae.evaluation",
    "bound_per_example": "vae.evaluation",
    "bound_with_parameters": "vae.evaluation",
    "importance_sampled_log_likelihood": "vae.evaluation",
    "EXPORT_SEED": "vae.export",
    "Exporter": "vae.export",
    "load_model": "vae.export",
    "save": "vae.export",
    "LoadedModel": "vae.serving",
    "load": "vae.serving",
    "METADATA_PATH": "vae.snapshot_format",
    "SIGNATURES": "vae.snapshot_format",
    "WARMUP_PATH": "vae.snapshot_format",
    "read_metadata": "vae.snapshot_format",
    "resolve_version": "vae.snapshot_format",
    "version_directories": "vae.snapshot_format",
    "write_metadata": "vae.snapshot_format",
    "VAE": "vae.model",
    "BoundParts": "vae.model",
    "parameter_count": "vae.model",
    "train_flops_per_example": "vae.model",
    "Adagrad": "vae.optimizers",
    "Adam": "vae.optimizers",
    "RMSProp": "vae.optimizers",
    "StepResult": "vae.train",
    "Trainer": "vae.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
