"""The NDOT engine: LIF neurons, temporal-dependency rules, trace-driven layers, models, loss, learner.

Bottom up: ``rules`` (which temporal terms a rule keeps) -> ``neuron`` (LIF dynamics, surrogate) ->
``state`` (explicit membrane/trace tensors) -> ``layers`` (one-pass trace-driven conv/linear) ->
``network`` and ``models`` -> ``loss`` -> ``learner`` (``OnlineLearner``). Public names are
re-exported by ``ndot_core``.

The learner's "local" backend (the online step without autograd): ``local_plan`` (which networks it
covers, their stages) -> ``workspace`` (temporaries reused across steps) -> ``local_step`` (the
forward and the hand-written backward of step t).
"""
