"""Adagrad, the paper's optimiser, and what a non-stationary stream asks of it.

Adagrad: theta <- theta - lr * g / (sqrt(G) + eps), G the sum of all past g^2, starting at
zero (Duchi et al. 2011; the update of `torch.optim.Adagrad` with its defaults). Because G
only grows, the steps shrink for ever and a model adapts ever more slowly to a change in
its data. Two remedies keep Adagrad's per-parameter scaling:

- `reset()`: when a drift detector fires, restart G at the next update as if only
  `reset_updates` updates had been summed, G <- n * max(G / N, g^2) for the N updates G
  holds and n = min(N, reset_updates): the next steps are as large as those of update n of
  a fresh run at the larger of each parameter's old scale and the new data's. (Zeroing G
  would make the next step lr * sign(g) in every coordinate, noise included: measured, it
  wrecked the model for ~10^4 examples. Shrinking G alone, to n * G / N, lets the first
  gradients of data whose gradients dwarf the old ones, such as inverted digits after
  plain ones, step by up to lr.)
- `half_life_examples`: exponential forgetting, G <- decay * G + g^2 with
  decay = 0.5 ** (batch / half_life_examples), so a gradient's weight in G halves every
  `half_life_examples` examples and the step size settles instead of vanishing.

Either remedy makes the steps larger than those the model has lately been taking, and a
model trained with small steps is thrown off by larger ones when its gradients grow: a sum
over hundreds of updates barely moves in a burst of growing gradients, so the steps grow
with them. Measured: at the paper's learning rate a half-life of 20,000 examples made the
bound dip every ~75,000 examples after 1.2*10^6, 100,000 dipped on inverted digits, and
`reset`'s restart sent the bound from -139 to -539 nats on new digits. So such an Adagrad
clips its steps as Adafactor does (Shazeer & Stern 2018, section 6), with
`update_clip_threshold` d: each tensor's step, in units of lr / sqrt(N) for the N updates G
holds, has a root mean square of about 1 while G keeps up with the gradients; when it
exceeds d, the tensor's step is scaled down to d.

A step boost (`step_boost`) answers a different shortage. After an abrupt change, such as
inverted digits after plain ones, the first gradients on the new data are large, the
accumulators take them in, and the steps stay small for as long as the accumulators
remember them, while the model has most of its learning still to do. `boost()` (at a drift
detection) multiplies the steps by `step_boost`, the excess halving every
STEP_BOOST_HALF_LIFE_EXAMPLES examples.

RMSProp and Adam are here as the usual baselines for comparison. Every optimiser keeps its
state in variables tracked by its module, so the state is part of a trainer's checkpoint.

>>> import tensorflow as tf
>>> w = tf.Variable([1.0, -1.0])
>>> adagrad = Adagrad([w], learning_rate=0.5)
>>> adagrad.apply_gradients([tf.constant([2.0, -4.0])], batch_size=1)
>>> [round(float(v), 4) for v in w.numpy()]   # the first step moves each weight by lr
[0.5, -0.5]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from vae.config import OPTIMIZERS

EPSILON = 1e-10
# Measured on MNIST (docs/benchmarks.md, "Non-stationary streams"): after 10^6 examples,
# reset to 500 updates' worth, the model reached the plain Adagrad's end-of-phase level on
# new digits in 74k examples instead of 131k, and zeroing ended 38 nats worse on inverted
# ones; after 4*10^6, restarting at the new gradients' scale where larger ended inverted
# digits 17 nats better than shrinking the old sums alone.
RESET_UPDATES = 500
# Measured on MNIST after 4*10^6 examples with a half-life of 100,000 (docs/benchmarks.md,
# "Non-stationary streams, part three"): steps tripled at the detection of inverted digits,
# the boost halving every 25,000 examples, reached the paper's Adagrad's end-of-phase level
# in 90,200 examples instead of 133,100; doubled with half-lives of 50,000 and 100,000
# examples, 105,900 and 113,900; tripled for 50,000 examples and then cut back at once,
# about as fast, but a sudden cut makes the bound jump when it comes.
STEP_BOOST_HALF_LIFE_EXAMPLES = 25_000.0
ADAM_EPSILON = 1e-8


class Optimizer(tf.Module):
    """State per parameter in slot variables; `apply_gradients` runs inside tf.function.

    An optimiser made with the `state` of another (the variables `state()` returns) acts on
    those: one compiled step serves every model of a configuration that way, taking each
    model's variables as arguments (see `vae.train`).
    """

    # The attributes holding the optimiser's variables, as `state()` returns them.
    STATE: tuple[str, ...] = ()

    def __init__(self, variables: Sequence[tf.Variable], learning_rate: float, name: str):
        super().__init__(name=name)
        self.learning_rate = learning_rate
        # Kept as a tuple of references, not tracked: the model owns and checkpoints them.
        self._variables = tuple(variables)

    def state(self) -> dict[str, Any]:
        """The optimiser's variables by attribute name (lists for per-parameter slots)."""
        return {name: getattr(self, name) for name in self.STATE}

    def _adopt(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.STATE):
            raise ValueError(f"{type(self).__name__} state needs {self.STATE}, got {sorted(state)}")
        for name in self.STATE:
            setattr(self, name, state[name])

    def _slots(self, label: str) -> list[tf.Variable]:
        with self.name_scope:
            # Zeros from NumPy: a new model's slots, ~80 µs less each than tf.zeros_like,
            # which reads the variable first (a fleet makes one model per key).
            return [
                tf.Variable(
                    np.zeros(v.shape, v.dtype.as_numpy_dtype),
                    trainable=False,
                    name=v.name.split(":")[0].replace("/", "_") + "_" + label,
                )
                for v in self._variables
            ]

    def apply_gradients(self, gradients: Sequence[tf.Tensor], batch_size: tf.Tensor) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forgets the gradient history: the next steps are as large as the first ones."""
        for slot in self.trainable_state():
            slot.assign(tf.zeros_like(slot))

    def trainable_state(self) -> list[tf.Variable]:
        return []


class Adagrad(Optimizer):
    """Per-parameter step sizes lr / sqrt(sum of squared gradients), optionally forgetting."""

    STATE = ("accumulators", "updates_summed", "restart_pending", "boost_excess")

    def __init__(
        self,
        variables: Sequence[tf.Variable],
        learning_rate: float,
        half_life_examples: float | None = None,
        update_clip_threshold: float | None = None,
        reset_updates: int = RESET_UPDATES,
        step_boost: float | None = None,
        name: str = "adagrad",
        state: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(variables, learning_rate, name)
        if half_life_examples is not None and not half_life_examples > 0:
            raise ValueError(f"half_life_examples must be positive, got {half_life_examples}")
        if update_clip_threshold is not None and not update_clip_threshold > 0:
            raise ValueError(f"update_clip_threshold must be positive, got {update_clip_threshold}")
        if reset_updates < 1:
            raise ValueError(f"reset_updates must be at least 1, got {reset_updates}")
        if step_boost is not None and not step_boost > 1:
            raise ValueError(f"step_boost must be above 1, got {step_boost}")
        self.half_life_examples = half_life_examples
        self.update_clip_threshold = update_clip_threshold
        self.reset_updates = reset_updates
        self.step_boost = step_boost
        if state is not None:
            self._adopt(state)
            return
        self.accumulators = self._slots("accumulator")
        with self.name_scope:
            # How many updates the accumulators hold (fewer when they forget or were reset).
            self.updates_summed = tf.Variable(0.0, trainable=False, name="updates_summed")
            # Set by `reset`; the next update, the first on the data that set off the
            # detector, restarts the accumulators.
            self.restart_pending = tf.Variable(False, trainable=False, name="restart_pending")
            # The steps are (1 + boost_excess) times Adagrad's; `boost` raises it.
            self.boost_excess = tf.Variable(0.0, trainable=False, name="boost_excess")

    def trainable_state(self) -> list[tf.Variable]:
        return self.accumulators

    def reset(self) -> None:
        """Restarts the accumulators at the next update, from that update's gradients."""
        self.restart_pending.assign(True)

    def boost(self) -> None:
        """Multiplies the next steps by `step_boost`, relaxing back (see the module)."""
        if self.step_boost is None:
            raise ValueError("this Adagrad has no step_boost")
        self.boost_excess.assign(self.step_boost - 1.0)

    def _restart(self, gradients: Sequence[tf.Tensor]) -> None:
        # What `reset_updates` updates would sum at each parameter's larger scale: its mean
        # square so far, or its square in this minibatch, the first the reset sees of the new
        # data. With the history alone, the new data's larger gradients could step by up to lr.
        updates = tf.minimum(self.updates_summed, float(self.reset_updates))
        summed = tf.maximum(self.updates_summed, 1.0)
        for accumulator, gradient in zip(self.accumulators, gradients, strict=True):
            mean_square = accumulator / summed
            accumulator.assign(updates * tf.maximum(mean_square, tf.square(gradient)))
        self.updates_summed.assign(updates)
        self.restart_pending.assign(False)

    def apply_gradients(self, gradients: Sequence[tf.Tensor], batch_size: tf.Tensor = 1) -> None:
        tf.cond(self.restart_pending, lambda: self._restart(gradients), lambda: None)
        decay = 1.0
        if self.half_life_examples is not None:
            decay = tf.pow(0.5, tf.cast(batch_size, tf.float32) / self.half_life_examples)
            for accumulator in self.accumulators:
                accumulator.assign(accumulator * decay)
        self.updates_summed.assign(self.updates_summed * decay + 1.0)
        boosted_rate = tf.constant(self.learning_rate)
        if self.step_boost is not None:
            boosted_rate *= 1.0 + self.boost_excess
            relax = tf.pow(0.5, tf.cast(batch_size, tf.float32) / STEP_BOOST_HALF_LIFE_EXAMPLES)
            self.boost_excess.assign(self.boost_excess * relax)
        for variable, accumulator, gradient in zip(
            self._variables, self.accumulators, gradients, strict=True
        ):
            learning_rate = boosted_rate
            if self.update_clip_threshold is not None:
                step_rms = self._relative_step_rms(accumulator, gradient)
                learning_rate /= tf.maximum(1.0, step_rms / self.update_clip_threshold)
            # The fused kernel updates accumulator and variable in one pass over memory.
            tf.raw_ops.ResourceApplyAdagradV2(
                var=variable.handle,
                accum=accumulator.handle,
                lr=learning_rate,
                epsilon=tf.constant(EPSILON, variable.dtype),
                grad=gradient,
                use_locking=False,
            )

    def _relative_step_rms(self, accumulator: tf.Variable, gradient: tf.Tensor) -> tf.Tensor:
        """RMS over a tensor of g / sqrt(G / N), G including this g^2: about 1 when the
        gradients are as large as those G holds, larger when they outgrow them."""
        squares = tf.square(gradient)
        shares = tf.math.divide_no_nan(squares, accumulator + squares)
        return tf.sqrt(tf.reduce_mean(shares) * self.updates_summed)


class RMSProp(Optimizer):
    """Tieleman & Hinton's RMSProp: lr * g / sqrt(moving average of g^2)."""

    STATE = ("mean_squares", "_momenta")

    def __init__(
        self,
        variables: Sequence[tf.Variable],
        learning_rate: float,
        rho: float = 0.9,
        name: str = "rmsprop",
        state: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(variables, learning_rate, name)
        self.rho = rho
        if state is not None:
            self._adopt(state)
            return
        self.mean_squares = self._slots("mean_square")
        self._momenta = self._slots("momentum")  # required by the fused kernel; stays zero

    def trainable_state(self) -> list[tf.Variable]:
        return self.mean_squares

    def apply_gradients(self, gradients: Sequence[tf.Tensor], batch_size: tf.Tensor = 1) -> None:
        for variable, mean_square, momentum, gradient in zip(
            self._variables, self.mean_squares, self._momenta, gradients, strict=True
        ):
            tf.raw_ops.ResourceApplyRMSProp(
                var=variable.handle,
                ms=mean_square.handle,
                mom=momentum.handle,
                lr=tf.constant(self.learning_rate, variable.dtype),
                rho=tf.constant(self.rho, variable.dtype),
                momentum=tf.constant(0.0, variable.dtype),
                epsilon=tf.constant(ADAM_EPSILON, variable.dtype),
                grad=gradient,
            )


class Adam(Optimizer):
    """Kingma & Ba's Adam with bias correction."""

    STATE = ("first_moments", "second_moments", "beta_1_power", "beta_2_power")

    def __init__(
        self,
        variables: Sequence[tf.Variable],
        learning_rate: float,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        name: str = "adam",
        state: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(variables, learning_rate, name)
        self.beta_1, self.beta_2 = beta_1, beta_2
        if state is not None:
            self._adopt(state)
            return
        self.first_moments = self._slots("first_moment")
        self.second_moments = self._slots("second_moment")
        with self.name_scope:
            self.beta_1_power = tf.Variable(1.0, trainable=False, name="beta_1_power")
            self.beta_2_power = tf.Variable(1.0, trainable=False, name="beta_2_power")

    def trainable_state(self) -> list[tf.Variable]:
        return self.first_moments + self.second_moments

    def reset(self) -> None:
        super().reset()
        self.beta_1_power.assign(1.0)
        self.beta_2_power.assign(1.0)

    def apply_gradients(self, gradients: Sequence[tf.Tensor], batch_size: tf.Tensor = 1) -> None:
        self.beta_1_power.assign(self.beta_1_power * self.beta_1)
        self.beta_2_power.assign(self.beta_2_power * self.beta_2)
        for variable, m, v, gradient in zip(
            self._variables, self.first_moments, self.second_moments, gradients, strict=True
        ):
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle,
                m=m.handle,
                v=v.handle,
                beta1_power=self.beta_1_power,
                beta2_power=self.beta_2_power,
                lr=tf.constant(self.learning_rate, variable.dtype),
                beta1=tf.constant(self.beta_1, variable.dtype),
                beta2=tf.constant(self.beta_2, variable.dtype),
                epsilon=tf.constant(ADAM_EPSILON, variable.dtype),
                grad=gradient,
            )


def make_optimizer(
    kind: str,
    variables: Sequence[tf.Variable],
    learning_rate: float,
    half_life_examples: float | None = None,
    update_clip_threshold: float | None = None,
    step_boost: float | None = None,
    state: Mapping[str, Any] | None = None,
) -> Optimizer:
    """The optimiser a `VAEConfig` names, with new state or acting on a given `state`."""
    if kind == "adagrad":
        return Adagrad(
            variables,
            learning_rate,
            half_life_examples,
            update_clip_threshold,
            step_boost=step_boost,
            state=state,
        )
    if half_life_examples is not None or update_clip_threshold is not None or step_boost:
        raise ValueError("a half-life, an update clip and a step boost apply to Adagrad only")
    if kind == "rmsprop":
        return RMSProp(variables, learning_rate, state=state)
    if kind == "adam":
        return Adam(variables, learning_rate, state=state)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
