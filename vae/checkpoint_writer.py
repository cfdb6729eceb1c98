"""Checkpoint writes at the cost of their tensors: TensorFlow's files, its object graph once.

`tf.train.Checkpoint.write` walks the object graph, serialises it and reads every variable
through Python wrappers on each call: about 2 ms a write, as long as writing a 784-200-10
model's parameters takes. A fleet's snapshots write one structure thousands of times (the
variables of a SavedModel, `vae.export`). `write_checkpoint` lets TensorFlow write the first
checkpoint of each structure and keeps its serialised object graph; the writes after it
are the same two files, byte for byte, written by one `SaveV2` op under the keys TensorFlow
gives the variables (their object paths).

>>> import tempfile
>>> root = tf.train.Checkpoint(weights=tf.Variable([1.0, 2.0]), step=tf.Variable(7))
>>> prefix = write_checkpoint(root, tempfile.mkdtemp() + "/ckpt-1")   # TensorFlow writes it
>>> _ = root.weights.assign([3.0, 4.0])
>>> prefix = write_checkpoint(root, prefix.replace("ckpt-1", "ckpt-2"))  # the fast path
>>> restored = tf.train.Checkpoint(weights=tf.Variable([0.0, 0.0]), step=tf.Variable(0))
>>> _ = restored.read(prefix).assert_consumed()      # as `root.write` wrote it
>>> restored.weights.numpy().tolist(), int(restored.step)
([3.0, 4.0], 7)
"""

from __future__ import annotations

import collections

import tensorflow as tf

# The checkpoint key under which TensorFlow stores a checkpoint's serialised object graph.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"

# Serialised object graph (a string tensor) of each structure written in this process.
_object_graphs: dict[tuple, tf.Tensor] = {}


def write_checkpoint(root: tf.train.Checkpoint, prefix: str) -> str:
    """Writes `root`'s variables as `root.write(prefix)` would, and returns `prefix`.

    Two objects have one structure when their object paths, node types and variables'
    dtypes and shapes agree; the first of each is written by TensorFlow itself, which also
    checks that the keys found here are TensorFlow's.
    """
    nodes = object_paths(root)
    structure = tuple(
        (path, type(node).__name__, getattr(node, "dtype", None), _shape(node))
        for path, node in nodes
    )
    graph = _object_graphs.get(structure)
    if graph is None:
        root.write(prefix)
        _learn_structure(structure, nodes, prefix)
        return prefix
    variables = [
        (path + _VARIABLE_SUFFIX, node) for path, node in nodes if isinstance(node, tf.Variable)
    ]
    # The files of one write go to a temporary directory and are merged into `prefix`,
    # as TensorFlow's saver does: a writer killed midway leaves no half-written prefix.
    part = f"{prefix}_temp/part-00000-of-00001"
    tf.io.gfile.makedirs(f"{prefix}_temp")
    tf.raw_ops.SaveV2(
        prefix=part,
        tensor_names=[key for key, _ in variables] + [OBJECT_GRAPH_KEY],
        shape_and_slices=[""] * (len(variables) + 1),
        tensors=[variable for _, variable in variables] + [graph],
    )
    tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=[part], destination_prefix=prefix, delete_old_dirs=True
    )
    return prefix


def object_paths(root: tf.train.Checkpoint) -> list[tuple[str, object]]:
    """Every node of `root`'s checkpoint object graph but `root`, breadth first, under its
    object path (`trainer/model/encoder_hidden/kernel`): a variable's checkpoint key less
    its "/.ATTRIBUTES/VARIABLE_VALUE"."""
    nodes = []
    queue = collections.deque([("", root)])
    seen = {id(root)}
    while queue:
        path, node = queue.popleft()
        if path:
            nodes.append((path, node))
        if isinstance(node, tf.Variable):
            continue
        for name, child in tf.train.TrackableView.children(node).items():
            if id(child) not in seen:
                seen.add(id(child))
                queue.append((f"{path}/{_escape(name)}" if path else _escape(name), child))
    return nodes


def variables_by_path(root: tf.train.Checkpoint) -> dict[str, tf.Variable]:
    """The variables of `root`'s checkpoint object graph by object path."""
    return {path: node for path, node in object_paths(root) if isinstance(node, tf.Variable)}


def _learn_structure(structure: tuple, nodes: list[tuple[str, object]], prefix: str) -> None:
    """Keeps the object graph TensorFlow wrote at `prefix`, once its keys are checked."""
    reader = tf.train.load_checkpoint(prefix)
    written = set(reader.get_variable_to_shape_map()) - {OBJECT_GRAPH_KEY}
    found = {path + _VARIABLE_SUFFIX for path, node in nodes if isinstance(node, tf.Variable)}
    if written != found:
        raise ValueError(
            f"the checkpoint keys found by walking the object graph differ from "
            f"TensorFlow's: {sorted(found ^ written)}"
        )
    graph = tf.constant(reader.get_tensor(OBJECT_GRAPH_KEY), dtype=tf.string)
    # Two threads may both learn a structure: they store the same graph.
    _object_graphs[structure] = graph


def _escape(name: str) -> str:
    """An edge name as TensorFlow writes it in a key: "/" separates the path's edges."""
    return name.replace(".", "..").replace("/", ".S")


def _shape(node: object) -> tuple | None:
    shape = getattr(node, "shape", None)
    return None if shape is None else tuple(shape)
