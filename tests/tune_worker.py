"""Run in a subprocess by the cache tests: tune some CPU keys with test-only backends, print counters."""

import json
import sys

import torch

import mishops
from mishops import registry, tuning
from tests.fake_backends import Fast, Slow

registry.register(Fast)
registry.register(Slow)
for spec in sys.argv[1:]:
    shape = tuple(int(s) for s in spec.split("x"))
    mishops.mish2(torch.randn(shape))
print(json.dumps({"stats": tuning.stats, "choices": {c.key: [c.winner, c.how] for c in mishops.last_choices()}}))
