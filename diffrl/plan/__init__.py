"""``diffrl plan``: a training step at full size, traced by diffrl's own code under fake tensors.

- :mod:`~diffrl.plan.memory`: live tensor memory per phase, split by what each storage is;
- :mod:`~diffrl.plan.values`: real values for small tensors, fixed answers for large fake ones;
- :mod:`~diffrl.plan.fake_models`: ``from_pretrained`` building from a folder's configs;
- :mod:`~diffrl.plan.architectures`: the published configs' models as config-only folders;
- :mod:`~diffrl.plan.stand_ins`: the reward and the reasoning tasks of a traced run;
- :mod:`~diffrl.plan.trace`: one step traced; :mod:`~diffrl.plan.planner`: sizes, verdict, suggestions;
- :mod:`~diffrl.plan.hardware`: GPUs; :mod:`~diffrl.plan.command`: the command line.
"""
