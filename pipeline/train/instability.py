"""Was it the data or the model? A check of each drift detection against earlier examples.

A drift detector sees the test-then-train bound get worse. The data may have changed -- or
the model may have broken itself: a burst of large steps (Frey Face's Gaussian decoder, 18
passes in: the bound fell by 250 nats in three minibatches and stayed 100 down for a while;
Adagrad with a short accumulator half-life on MNIST) makes every example look worse, old and
new alike. So the session keeps a few examples it trained on a while ago, with the bound it
measured for them then, and on a detection scores them under the current model:

- the model broke: the earlier examples got worse by about as much as the new ones did, and
  the current model explains the two alike -- they are of one distribution;
- the data changed: the current model still explains the earlier examples about as well as
  then (a few steps on very different data cost it a little: one minibatch of inverted
  digits, 40 nats on plain ones late in training), or, where those few steps cost it much
  (early, with the paper's Adagrad: 350 nats), it explains the new examples quite unlike the
  earlier ones.

A detection whose earlier examples rose by at least `SHARE` of the new ones' rise, and whose
new and earlier examples the current model explains within `SAME_NOISE` noise units of each
other, is the model's own instability, not drift. The examples are `ROWS` rows of one
minibatch taken every `LAG_MINIBATCHES`, kept in turn so that the ones scored are 10 to 20
minibatches old: from before a change the detector found within 10 (Page-Hinkley on abrupt
shifts: 1 to 4).

>>> import numpy as np, vae
>>> model = vae.VAE(vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8))
>>> check = InstabilityCheck()
>>> batch = np.eye(4, dtype=np.float32)
>>> for _ in range(2 * LAG_MINIBATCHES):
...     check.observe(batch, vae.bound_per_example(model, batch)["elbo"])
>>> unstable, earlier_rise = check.is_instability(model, batch, rise=50.0, noise_scale=1.0)
>>> unstable, abs(earlier_rise) < 1e-3       # the same model: the earlier examples did not rise
(False, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

import vae

__all__ = ["LAG_MINIBATCHES", "ROWS", "SAME_NOISE", "SHARE", "InstabilityCheck"]

ROWS = 16
LAG_MINIBATCHES = 10
SHARE = 0.5
# Two means of one distribution, of ROWS and of a minibatch (M = 100), differ by about 2.7
# times the minibatch noise: five is far for them, near for two distributions a detection
# tells apart.
SAME_NOISE = 5.0


class InstabilityCheck:
    """Earlier examples with their bounds then, and the rise of their bound since."""

    def __init__(self) -> None:
        # (rows, their bounds when trained on): the older sample, then the newer.
        self._samples: list[tuple[np.ndarray, np.ndarray]] = []
        self._since_sample = LAG_MINIBATCHES - 1  # a first sample from the first minibatch

    def observe(self, batch: np.ndarray, bounds: np.ndarray) -> None:
        """After each applied minibatch: its rows and their test-then-train bounds."""
        self._since_sample += 1
        if self._since_sample < LAG_MINIBATCHES:
            return
        self._since_sample = 0
        sample = (np.array(batch[:ROWS], np.float32), np.array(bounds[:ROWS], np.float64))
        self._samples = [*self._samples[-1:], sample]

    def is_instability(
        self,
        model: vae.VAE,
        batch: np.ndarray,
        rise: float,
        noise_scale: float,
        seed: int = 0,
    ) -> tuple[bool, float]:
        """Whether a detected `rise` (nats) of the bound on `batch` is the model's own (the
        earlier examples rose by at least SHARE of it, and `model` explains `batch` and
        them alike, within SAME_NOISE times `noise_scale`, the minibatch noise in nats).
        Also returns the earlier examples' rise."""
        if not self._samples:
            return False, float("nan")
        rows, then = self._samples[0]
        earlier_now = _bound(model, rows, seed).mean()
        earlier = float(then.mean() - earlier_now)
        if earlier < SHARE * rise:
            return False, earlier
        new_now = _bound(model, batch, seed).mean()
        return bool(abs(new_now - earlier_now) <= SAME_NOISE * noise_scale), earlier

    def state(self) -> dict[str, Any]:
        return {"since_sample": self._since_sample, "samples": len(self._samples)}

    def arrays(self) -> dict[str, np.ndarray]:
        named = {}
        for index, (rows, bounds) in enumerate(self._samples):
            named[f"instability/{index}/rows"], named[f"instability/{index}/bounds"] = rows, bounds
        return named

    def load(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._since_sample = state["since_sample"]
        self._samples = [
            (arrays[f"instability/{i}/rows"], arrays[f"instability/{i}/bounds"])
            for i in range(state["samples"])
        ]


def _bound(model: vae.VAE, rows: np.ndarray, seed: int) -> np.ndarray:
    # Through the scratch model of its config: one compiled function for every key's model.
    return vae.bound_with_parameters(model.config, model.parameters(), rows, seed)
