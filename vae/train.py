"""Online training: one compiled, test-then-train Adagrad step per minibatch.

The step is compiled once per model configuration, not once per model: it takes a
trainer's variables as arguments (`StepProgram`), so a fleet of models -- one per tenant or
sensor -- shares one XLA program, and a new model costs only the allocation of its state.

Each step first evaluates the SGVB bound of the incoming minibatch under the current
parameters -- an honest estimate on data the model has not been trained on -- then ascends
the gradient of that same estimate. A minibatch whose loss or gradients are not finite is
counted and skipped; the parameters never see it.

>>> import numpy as np
>>> trainer = Trainer(VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8, batch_size=2))
>>> result = trainer.train_step(np.array([[0, 1, 1, 0], [1, 1, 0, 0]], np.float32))
>>> result.elbo.shape, result.applied, (result.step, result.examples_seen, result.skipped_steps)
((2,), True, (1, 2, 0))
>>> skipped = trainer.train_step(np.full((2, 4), np.nan, np.float32))
>>> skipped.applied, (skipped.step, skipped.examples_seen, skipped.skipped_steps)
(False, (1, 4, 1))
>>> trainer.step, trainer.examples_seen, trainer.skipped_steps
(1, 4, 1)
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from vae.config import VAEConfig
from vae.model import VAE
from vae.optimizers import make_optimizer


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step measured on its minibatch before updating (per example, nats), and
    the trainer's counters after it."""

    elbo: np.ndarray
    reconstruction_log_likelihood: np.ndarray
    kl: np.ndarray
    applied: bool
    step: int
    examples_seen: int
    skipped_steps: int


# Philox, named: `_draw_seed` implements it for a generator state given as an argument.
RNG_ALGORITHM = tf.random.Algorithm.PHILOX
# Philox's counter is two 64-bit words of the generator state; the key is the third.
PHILOX_COUNTER_SIZE = 2


def _draw_seed(rng_state: tf.Variable) -> tf.Tensor:
    """`tf.random.Generator.uniform_full_int([2], tf.int32)` of the generator whose state
    variable this is, with the same ops (checkpoints written before the step was shared
    continue with the same random numbers): advance the counter, then draw statelessly."""
    counter_key = tf.raw_ops.RngReadAndSkip(
        resource=rng_state.handle,
        alg=tf.constant(RNG_ALGORITHM.value, tf.int32),
        delta=tf.constant(2, tf.uint64),
    )
    counter = tf.bitcast(counter_key[:PHILOX_COUNTER_SIZE], tf.uint64)
    key = tf.bitcast(counter_key[PHILOX_COUNTER_SIZE : PHILOX_COUNTER_SIZE + 1], tf.uint64)
    return tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[2], key=key, counter=counter, alg=RNG_ALGORITHM.value, dtype=tf.int32
    )


class StepProgram:
    """The compiled test-then-train step of one model configuration, for any trainer of it.

    The trainer's variables -- parameters, optimiser state, counters and random state -- are
    arguments of the compiled function, not captures, so XLA compiles it once for all the
    trainers of a configuration (a second trainer's first step measured ~1 s before this
    became so: a trace and an XLA compilation per model).

    Binding ~20 variables to the arguments costs ~0.3 ms a call, 10-15% of a step of the
    paper's model. So a trainer made while no other of its configuration lives in the
    process -- the model of a one-model job, the first of a fleet -- gets a step of its own
    (`dedicated_step`) whose variables are captures: a job of one model runs as fast as
    before models shared their step, and a fleet pays for one more compilation, at its
    second model.
    """

    def __init__(self, config: VAEConfig) -> None:
        self.config = config
        self._jit_compile = uses_xla(config)
        self._function = tf.function(self._train_step, jit_compile=self._jit_compile)
        self._traced: tf.types.experimental.ConcreteFunction | None = None
        self._trainers: weakref.WeakSet[Trainer] = weakref.WeakSet()

    def dedicated_step(self, trainer: Trainer) -> Callable[..., Any] | None:
        """A step compiled for `trainer`'s variables alone (called as `step(x, count)`) if
        no other trainer of this configuration lives; None otherwise."""
        alone = len(self._trainers) == 0
        self._trainers.add(trainer)
        if not alone:
            return None
        state = trainer.state()
        return tf.function(
            lambda x, count: self._train_step(state, x, count),
            input_signature=[
                tf.TensorSpec([None, self.config.input_dim], tf.float32),
                tf.TensorSpec([], tf.int32),
            ],
            jit_compile=self._jit_compile,
        )

    @property
    def tracing_count(self) -> int:
        """How many times the step was traced (and compiled): 1 once it has run."""
        return self._function.experimental_get_tracing_count()

    def __call__(
        self, state: dict[str, Any], x: tf.Tensor, count: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Runs the step on `state` (a `Trainer.state()`): [4, M] rows of elbo,
        reconstruction, kl and whether the update was applied; and the counters after it,
        [step, examples seen, skipped steps] (reading them from their variables afterwards
        would cost three more calls into TensorFlow, ~5% of a step)."""
        if self._traced is None:
            # Calling the traced function itself skips tf.function's matching of the arguments
            # on every call: measured ~0.4 ms, a tenth of a step of the paper's model.
            self._traced = self._function.get_concrete_function(
                state,
                tf.TensorSpec([None, self.config.input_dim], tf.float32),
                tf.TensorSpec([], tf.int32),
            )
        return self._traced(state, x, count)

    def _train_step(
        self, state: dict[str, Any], x: tf.Tensor, count: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        config = self.config
        parameters = state["parameters"]
        model = VAE(config, parameters=parameters, matmul_dtype=tf.as_dtype(config.precision))
        optimizer = make_optimizer(
            config.optimizer,
            parameters,
            config.learning_rate,
            config.accumulator_half_life_examples,
            config.update_clip_threshold,
            config.drift_step_boost,
            state=state["optimizer"],
        )
        seed = _draw_seed(state["rng_state"])
        real = tf.range(tf.shape(x)[0]) < count
        with tf.GradientTape() as tape:
            parts = model.bound(x, seed)
            if config.method == "wake_sleep":
                # The bound above is measured, not ascended: wake-sleep follows its own terms.
                wake_sleep_seed = tf.random.experimental.stateless_fold_in(seed, 1)
                loss = -model.wake_sleep_objective(x, wake_sleep_seed, real)
            else:
                # tf.where, not a product with the mask: a padded row must not turn inf into nan.
                elbo = tf.where(real, parts.elbo, 0.0)
                loss = -tf.reduce_sum(elbo) / tf.cast(count, tf.float32)
            if config.weight_decay:
                loss -= config.weight_decay * model.prior_log_density()
        gradients = tape.gradient(loss, parameters)
        # NaN and inf propagate through sums, so one float reduction per gradient finds any
        # non-finite element (an elementwise is_finite pass cost ~5% of the step). Only sums
        # beyond float32's range (~3e38) would be flagged wrongly: no step worth taking.
        finite = tf.math.is_finite(loss + tf.add_n([tf.reduce_sum(g) for g in gradients]))

        def apply() -> tf.Tensor:
            optimizer.apply_gradients(gradients, batch_size=count)
            state["step"].assign_add(1)
            return tf.constant(True)

        def skip() -> tf.Tensor:
            state["skipped_steps"].assign_add(1)
            return tf.constant(False)

        applied = tf.cond(finite, apply, skip)
        state["examples_seen"].assign_add(tf.cast(count, tf.int64))
        applied_row = tf.fill(tf.shape(parts.elbo), tf.cast(applied, parts.elbo.dtype))
        measured = tf.stack(
            [parts.elbo, parts.reconstruction_log_likelihood, parts.kl, applied_row]
        )
        counters = tf.stack(
            [
                state["step"].read_value(),
                state["examples_seen"].read_value(),
                state["skipped_steps"].read_value(),
            ]
        )
        return measured, counters


def uses_xla(config: VAEConfig) -> bool:
    """Whether the step of `config` is compiled by XLA: in float32 only.

    XLA on the CPU (TensorFlow 2.21) computes a bfloat16 dot in float32: its optimised HLO
    converts both operands to f32 before the `dot` and rounds the product back to bf16, so a
    bfloat16 step compiled by XLA would do the float32 work plus the conversions. In graph
    mode the MatMul kernel is oneDNN's, which multiplies bfloat16 with the CPU's bfloat16
    instructions (AVX512_BF16, AMX) where it has them.
    """
    return config.precision == "float32"


@functools.cache
def _shared_program(config: VAEConfig) -> StepProgram:
    return StepProgram(config)


def step_program(config: VAEConfig) -> StepProgram:
    """The one `StepProgram` of this process for `config`'s model and learning algorithm.

    The seed only draws the initial parameters and random state, which the step takes as
    arguments: configurations that differ in it share a program.
    """
    return _shared_program(dataclasses.replace(config, seed=0))


class Trainer(tf.Module):
    """The model, its optimiser and the counters and random state of a training run.

    Everything a run needs to continue exactly is a variable tracked by this module, so
    `tf.train.Checkpoint(trainer=trainer)` saves and restores it whole: parameters, Adagrad
    accumulators, step, examples seen, skipped steps and the random generator.
    """

    def __init__(self, config: VAEConfig, name: str = "trainer") -> None:
        super().__init__(name=name)
        self.config = config
        self.model = VAE(config)
        self.optimizer = make_optimizer(
            config.optimizer,
            self.model.parameters(),
            config.learning_rate,
            config.accumulator_half_life_examples,
            config.update_clip_threshold,
            config.drift_step_boost,
        )
        with self.name_scope:
            self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self._examples_seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples")
            self._skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")
            self.rng = tf.random.Generator.from_seed(config.seed, alg=RNG_ALGORITHM)
        self._full_count: tf.Tensor | None = None
        self._program = step_program(config)
        self._dedicated_step = self._program.dedicated_step(self)
        self._traced_dedicated_step: tf.types.experimental.ConcreteFunction | None = None

    @property
    def step(self) -> int:
        """Updates applied so far."""
        return int(self._step.numpy())

    @property
    def examples_seen(self) -> int:
        """Examples consumed so far, including those of skipped minibatches."""
        return int(self._examples_seen.numpy())

    @property
    def skipped_steps(self) -> int:
        """Minibatches not applied because their loss or gradients were not finite."""
        return int(self._skipped_steps.numpy())

    def state(self) -> dict[str, Any]:
        """Every variable of the run, as the compiled step takes them."""
        return {
            "parameters": self.model.parameters(),
            "optimizer": self.optimizer.state(),
            "step": self._step,
            "examples_seen": self._examples_seen,
            "skipped_steps": self._skipped_steps,
            "rng_state": self.rng.state,
        }

    def reset_optimizer(self) -> None:
        """Forgets the optimiser's gradient history (the `reset` drift adaptation)."""
        self.optimizer.reset()

    def boost_steps(self) -> None:
        """Multiplies the next steps by the config's `drift_step_boost` (at a drift
        detection), relaxing back to Adagrad's own."""
        self.optimizer.boost()

    def checkpoint(self) -> tf.train.Checkpoint:
        """A checkpoint object over the whole training state; the caller writes it."""
        return tf.train.Checkpoint(trainer=self)

    def train_step(self, batch: np.ndarray) -> StepResult:
        """Measures the bound of `batch` [B, D] and then updates on it.

        A batch smaller than M (a stream's partial minibatch) is padded to M rows that the
        loss masks out: XLA compiles one program per input shape, and a stream would
        otherwise compile one for every partial size it meets.
        """
        batch = np.asarray(batch, dtype=np.float32)
        count = len(batch)
        if count == 0 or batch.ndim != 2 or batch.shape[1] != self.config.input_dim:
            raise ValueError(
                f"expected a non-empty batch of shape [B, {self.config.input_dim}], "
                f"got {batch.shape}"
            )
        if count < self.config.batch_size:
            padded = np.zeros((self.config.batch_size, self.config.input_dim), np.float32)
            padded[:count] = batch
            batch = padded
        # One [4, B] result and one of counters: every fetch costs as much as ~1% of a step.
        x, count_tensor = tf.constant(batch), self._count(count)
        if self._dedicated_step is None:
            measured, counters = self._program(self.state(), x, count_tensor)
        else:
            if self._traced_dedicated_step is None:
                # Calling the traced function itself skips tf.function's matching of the
                # arguments on every call: measured ~0.4 ms, a tenth of a step.
                self._traced_dedicated_step = self._dedicated_step.get_concrete_function()
            measured, counters = self._traced_dedicated_step(x, count_tensor)
        parts, (step, examples_seen, skipped_steps) = measured.numpy(), counters.numpy().tolist()
        return StepResult(
            parts[0, :count],
            parts[1, :count],
            parts[2, :count],
            bool(parts[3, 0]),
            step,
            examples_seen,
            skipped_steps,
        )

    def _count(self, count: int) -> tf.Tensor:
        if count != self.config.batch_size:
            return tf.constant(count, tf.int32)
        if self._full_count is None:
            self._full_count = tf.constant(count, tf.int32)
        return self._full_count
