"""badnet_jax.models.graph_split: the nodes every path to a target passes through, against brute force over
the paths, in memory linear in an untrusted graph. The split itself and the layer's checks run through
``GraphCNN`` (tests/models/test_graph.py, tests/defense/test_any_cnn.py)."""

from __future__ import annotations

import tracemalloc

from badnet_jax.io.keras_graph import read_keras_graph
from badnet_jax.models.graph_split import _dominators
from badnet_jax.models.ir import Graph, Node
from tests.conftest import asset

FILES = ("models/other/resnet_tiny.h5", "models/other/vgg_tiny.h5")


def _dominators_by_paths(graph, target):
    """Brute force: the nodes on every path from a node without inputs to ``target``."""
    by_name = graph.by_name
    def paths(name):
        node = by_name[name]
        if not node.inputs:
            return [[name]]
        return [p + [name] for src in node.inputs for p in paths(src)]
    every = [set(p) for p in paths(target)]
    return [n.name for n in graph.nodes if all(n.name in p for p in every)]


def test_dominators_are_the_nodes_every_path_passes_and_cost_linear_memory():
    for name in FILES:
        graph, _ = read_keras_graph(asset(name))
        for target in (graph.logits_node(), *[n.name for n in graph.nodes[1::3]]):
            assert _dominators(graph, target) == _dominators_by_paths(graph, target), (name, target)
    # A file's graph is untrusted: a chain of 19 000 relus (a 2 MB document) must not take memory quadratic in it.
    nodes = [Node.make("input", "input")]
    for i in range(19_000):
        nodes.append(Node.make(f"r{i}", "relu", (nodes[-1].name,)))
    chain = Graph(nodes=tuple(nodes), input_hwc=(8, 8, 3), output=nodes[-1].name, name="chain")
    tracemalloc.start()
    got = _dominators(chain, nodes[-1].name)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(got) == len(nodes) and peak < 50 * 2**20, peak


def test_layers_that_do_not_fit_are_a_model_file_error():
    """A convolution reading a pooled vector (a checkpoint whose pooling lost its keepdims): the shapes do not
    compose, said as such, not an IndexError from inside the convolution."""
    import pytest

    from badnet_jax.errors import ModelFileError
    from badnet_jax.models.graph_split import infer_shapes

    nodes = (Node.make("in", "input"), Node.make("gap", "global_avg_pool", ("in",)),
             Node.make("c", "conv", ("gap",), "c"))
    with pytest.raises(ModelFileError, match="its layers do not fit together"):
        infer_shapes(Graph(nodes, (4, 4, 3), "c", "m"), (("c", (("kernel", (1, 1, 3, 2)),)),))
