"""How a parameter group's arrays from several sites become one: a policy per group.

Policies work on named numpy arrays only (no Flower, no torch), so the coordinator's
strategy, the config check and the benchmarks share them. One file per policy family,
found by name through ``registry``; ``local`` is not here: a local group never leaves
its site, so there is nothing to combine."""
