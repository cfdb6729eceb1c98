"""Adagrad, the paper's optimiser, with its state kept in checkpointable variables.

theta <- theta - lr * g / (sqrt(sum of past g^2) + eps), accumulators starting at zero
(Duchi et al. 2011; the same update as `torch.optim.Adagrad` with its defaults).

>>> import tensorflow as tf
>>> w = tf.Variable([1.0, -1.0])
>>> adagrad = Adagrad([w], learning_rate=0.5)
>>> adagrad.apply_gradients([tf.constant([2.0, -4.0])])
>>> [round(float(v), 4) for v in w.numpy()]   # the first step moves each weight by lr
[0.5, -0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

EPSILON = 1e-10


class Adagrad(tf.Module):
    """Per-parameter step sizes lr / sqrt(sum of squared gradients)."""

    def __init__(
        self, variables: Sequence[tf.Variable], learning_rate: float, name: str = "adagrad"
    ) -> None:
        super().__init__(name=name)
        self.learning_rate = learning_rate
        # Kept as a tuple of references, not tracked: the model owns and checkpoints them.
        self._variables = tuple(variables)
        with self.name_scope:
            self.accumulators = [
                tf.Variable(
                    tf.zeros_like(v), trainable=False, name=v.name.split(":")[0] + "_accumulator"
                )
                for v in self._variables
            ]

    def apply_gradients(self, gradients: Sequence[tf.Tensor]) -> None:
        for variable, accumulator, gradient in zip(
            self._variables, self.accumulators, gradients, strict=True
        ):
            # The fused kernel updates accumulator and variable in one pass over memory.
            tf.raw_ops.ResourceApplyAdagradV2(
                var=variable.handle,
                accum=accumulator.handle,
                lr=tf.constant(self.learning_rate, variable.dtype),
                epsilon=tf.constant(EPSILON, variable.dtype),
                grad=gradient,
                use_locking=False,
            )

    def reset(self) -> None:
        """Forgets the gradient history, so the next steps are as large as the first ones."""
        for accumulator in self.accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
