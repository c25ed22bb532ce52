"""The NDOT engine: LIF neurons, temporal-dependency rules, trace-driven layers, models, loss, learner.

Bottom up: ``rules`` (which temporal terms a rule keeps) -> ``neuron`` (LIF dynamics, surrogate) ->
``state`` (explicit membrane/trace tensors) -> ``layers`` (one-pass trace-driven conv/linear) ->
``network`` and ``models`` -> ``loss`` -> ``learner`` (``OnlineLearner``). Public names are
re-exported by ``ndot_core``.
"""
