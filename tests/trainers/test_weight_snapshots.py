"""weight_snapshots: the trained weights swapped out for a reference's forwards and back, in one process and
under FSDP2 (two gloo processes, each swapping its own shard), and whole-weight copies for checkpoints."""

import json

import torch

from diffrl.training.weight_snapshots import WeightSnapshots
from tests.conftest import accelerate_launch


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 7), torch.nn.Linear(7, 3))


def test_snapshots_swap_in_and_out_bit_for_bit():
    model, x = _model(), torch.randn(4, 5)
    model[2].requires_grad_(False)  # frozen weights are not the snapshot's business
    snapshots = WeightSnapshots(model)
    assert sorted(snapshots.params) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    before, y_before = snapshots.take(), model(x).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    y_after, after = model(x).detach(), {n: p.detach().clone() for n, p in model.named_parameters()}
    with snapshots.applied(before):
        assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[2].weight, after["2.weight"])
        assert not torch.equal(model(x), y_before) and not torch.equal(model(x), y_after)   # layer 2 kept its +0.5
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters())
    whole = snapshots.full(before)
    assert whole.keys() == before.keys() and all(torch.equal(whole[k], before[k]) for k in whole)
    again = snapshots.from_full(whole)
    assert all(torch.equal(again[k], before[k]) and again[k].device.type == "cpu" for k in before)


SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from diffrl.training.weight_snapshots import WeightSnapshots

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 7), torch.nn.Linear(7, 3))
whole_before = {k: v.clone() for k, v in model.state_dict().items()}
fully_shard(model[0]); fully_shard(model[2]); fully_shard(model)   # model[1]'s weights belong to the root unit
x = torch.randn(4, 5)
snapshots = WeightSnapshots(model)
with torch.no_grad():
    y_before = model(x)     # the root keeps its gathered weights after a forward without gradient
before = snapshots.take()
with torch.no_grad():
    for p in snapshots.params.values():
        p.to_local().add_(0.5)
for unit in (model, model[0], model[2]):  # FSDP's own call: drop the root's gathered (now stale) copy
    unit.reshard()
with torch.no_grad():
    y_after = model(x)      # the root now holds a gathered copy of the changed weights
with snapshots.applied(before), torch.no_grad():
    y_swapped = model(x)
with torch.no_grad():
    y_back = model(x)
model(x).sum().backward()   # training goes on after a swap
whole = snapshots.full(before)
again = snapshots.from_full(whole_before)
main = dist.get_rank() == 0
report = {"shard_numel": sum(t.numel() for t in before.values()),
          "swapped_equals_before": torch.equal(y_swapped, y_before),
          "after_differs": not torch.equal(y_after, y_before), "back_equals_after": torch.equal(y_back, y_after),
          "whole_equals_original": not main or all(torch.equal(whole[k], whole_before[k]) for k in whole_before),
          "from_full_equals_take": all(torch.equal(again[k], before[k]) for k in before)}
if main:
    open(sys.argv[1], "w").write(json.dumps(report))
dist.destroy_process_group()
from diffrl.training.run_setup import exit_process
exit_process(0)
'''


def test_snapshots_under_fsdp2_swap_each_process_shard(tmp_path):
    script = tmp_path / "swap.py"
    script.write_text(SCRIPT)
    result = accelerate_launch(script, tmp_path / "report.json")
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    total = 5 * 7 + 7 + 7 * 7 + 7 + 7 * 3 + 3
    assert 0 < report.pop("shard_numel") < total   # each process holds a shard, not the whole model
    assert all(report.values()), report
