"""`sftlab plan`: which fine-tuning method for this model, data and device, with the numbers behind the choice.

model.py       the model's config, a meta-device build (no weights), its sizes
structure.py   what trains where, block by block, after a method's own apply()
activations.py bytes autograd keeps per block, per family (checked against autograd itself)
estimate.py    one candidate: parameters, memory by part, FLOPs, time, storage, inference cost
candidates.py  the methods weighed;  workload.py  the data counted;  device.py  memory and throughput
rules.py       the recommendation: a rule table over the survey's four factors
measure.py     --measure: real steps per candidate, each in its own process
planner.py     make_plan / measure_plan / write_config;  report.py  table and JSON
"""

from .planner import Plan, PlanInputs, make_plan, measure_plan, write_config

__all__ = ["Plan", "PlanInputs", "make_plan", "measure_plan", "write_config"]
