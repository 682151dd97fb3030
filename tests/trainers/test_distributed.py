"""A real two-process gloo DDP run on CPU (accelerate launch --multi_gpu with Accelerator(cpu=True))."""

import json

import pytest

from tests.conftest import accelerate_launch

# Two-process launches run one at a time (one xdist group): two at once on 2 cores made gloo's teardown abort
# now and then ("terminate called without an active exception") after the work was done.
pytestmark = pytest.mark.xdist_group("two_processes")

SCRIPT = r'''
import json, sys, torch
from accelerate import Accelerator
from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.training import run_setup

acc = Accelerator(cpu=True)
model = MaskedDiffusionLM.from_pretrained(sys.argv[1])
model.add_lora(rank=4, alpha=8)
params = run_setup.trainable_parameters(model.module)
optimizer = torch.optim.SGD(params, lr=0.1)
ddp, optimizer = acc.prepare(model.module, optimizer)
model.denoiser = ddp
# Each rank sees different data; DDP must average the gradients.
ids = torch.randint(5, 90, (2, 12), generator=torch.Generator().manual_seed(100 + acc.process_index))
loss = model.logits(ids).logsumexp(-1).mean()
acc.backward(loss)
local = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.requires_grad}
# Recompute this rank's own gradient without syncing, to compare against the averaged one.
optimizer.zero_grad()
with acc.no_sync(ddp):
    acc.backward(model.logits(ids).logsumexp(-1).mean())
own = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.requires_grad}
mean_of_own = {n: acc.reduce(g, reduction="mean") for n, g in own.items()}
max_diff = max(float((local[n] - mean_of_own[n]).abs().max()) for n in local)
differs = max(float((own[n] - local[n]).abs().max()) for n in local)
optimizer.zero_grad()
acc.backward(model.logits(ids).logsumexp(-1).mean())
optimizer.step()
flat = torch.cat([p.detach().flatten() for p in params])
gathered = acc.gather(flat[None])
out = {"rank": acc.process_index, "world": acc.num_processes, "avg_err": max_diff, "own_vs_synced": differs,
       "weights_equal": bool(torch.equal(gathered[0], gathered[1]))}
with open(sys.argv[2] + f"/rank{acc.process_index}.json", "w") as f:
    json.dump(out, f)
from diffrl.training.run_setup import end_training, exit_process
end_training(acc)
exit_process(0)
'''


@pytest.mark.slow
def test_two_process_ddp_averages_gradients(tiny_dir, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    result = accelerate_launch(script, tiny_dir("dllm"), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for row in rows:
        assert row["world"] == 2
        assert row["avg_err"] < 1e-6          # synced gradient == mean of the two ranks' own gradients
        assert row["own_vs_synced"] > 1e-6    # and the ranks really had different gradients
        assert row["weights_equal"]           # so both ranks hold the same weights after the step


# AWM and NFT (the same rollout glue): @NAME@ / @CONFIG@ / @MODULE@ / @CLASS@ are filled in by the test.
FLOW_SCRIPT = r'''
import json, sys, torch
from diffrl.trainers import load_config
from @MODULE@ import @CLASS@ as Trainer
from diffrl.training import run_setup

config = load_config("@CONFIG@", [f"model.path={sys.argv[1]}", f"output_dir={sys.argv[2]}/run",
                     "max_steps=2", "logging.progress_bar=false", "prompts_per_step=3", "group_size=2",
                     "sample_batch_size=3", "train_batch_size=3", "data.eval_size=0", *@EXTRA@])
trainer = Trainer(config)
trainer.setup()
acc = trainer.accelerator
local_prompts, kept = [], []
for _ in range(2):
    batch = trainer.rollout()
    local_prompts.append(batch["prompts"])
    trainer.score(batch)
    kept.append(len(batch["prompts"]))
    trainer.update(batch)
    trainer.step += 1
    if hasattr(trainer, "_update_old_adapter"):
        trainer._update_old_adapter(trainer.step)
flat = torch.cat([p.detach().flatten() for p in trainer.params])
gathered = acc.gather(flat[None])
out = {"world": acc.num_processes, "weights_equal": bool(torch.equal(gathered[0], gathered[1])),
       "moved": float(flat.abs().sum()), "prompts": local_prompts, "kept": kept}
with open(sys.argv[2] + f"/@NAME@_rank{acc.process_index}.json", "w") as f:
    json.dump(out, f)
run_setup.end_training(acc)
run_setup.exit_process(0)
'''


@pytest.mark.slow
@pytest.mark.parametrize("name, trainer_class", [("awm", "AWMTrainer"), ("nft", "NFTTrainer")])
def test_two_process_flow_trainers_keep_ranks_identical(tiny_dir, tmp_path, name, trainer_class):
    rows = _flow_ranks(tiny_dir, tmp_path, name, trainer_class, [])
    # 3 prompts x 2 samples = 6 per step, 3 per rank: a prompt's group spans both processes
    for step in range(2):
        both = rows[0]["prompts"][step] + rows[1]["prompts"][step]
        assert len(both) == 6 and any(p in rows[1]["prompts"][step] for p in rows[0]["prompts"][step])


@pytest.mark.slow
def test_two_process_down_sampling_keeps_ranks_identical_with_unequal_shares(tiny_dir, tmp_path):
    """D^3S keeps 2 of each group of 12 (6 of 36 samples at step 0): the ranks keep what their samples give,
    not the same number each, and still update together."""
    rows = _flow_ranks(tiny_dir, tmp_path, "awm", "AWMTrainer",
                       ["group_size=12", "down_sampling.sample_keep=0.1", "down_sampling.anneal_steps=100"])
    assert [sum(step) for step in zip(rows[0]["kept"], rows[1]["kept"])] == [6, 6]   # 2 of each of 3 groups
    assert rows[0]["kept"] != rows[1]["kept"]    # this seed: 4 and 2 a step


def _flow_ranks(tiny_dir, tmp_path, name, trainer_class, extra):
    script = tmp_path / f"{name}_ddp.py"
    script.write_text(FLOW_SCRIPT.replace("@NAME@", name).replace("@CONFIG@", f"configs/{name}/tiny_sd3_jpeg.yaml")
                      .replace("@MODULE@", f"diffrl.trainers.{name}").replace("@CLASS@", trainer_class)
                      .replace("@EXTRA@", repr(extra)))
    result = accelerate_launch(script, tiny_dir("sd3"), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    rows = [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(row["world"] == 2 and row["weights_equal"] and row["moved"] > 0 for row in rows)
    return rows


SEPPO_SCRIPT = r'''
import json, sys, torch
from diffrl.trainers import load_config
from diffrl.models.lora import lora_state_dict
from diffrl.trainers.seppo import SePPOTrainer
from diffrl.training import run_setup

config = load_config("configs/seppo/tiny_sd15.yaml", [f"model.path={sys.argv[1]}", f"data.path={sys.argv[3]}",
                     f"output_dir={sys.argv[2]}/run", "logging.progress_bar=false", "data.eval_size=0",
                     "bank_every=1", "train_batch_size=1"])
trainer = SePPOTrainer(config)
trainer.setup()
acc = trainer.accelerator
captions, references = [], []
for _ in range(3):
    batches = trainer.rollout()
    captions.append([c for b in batches for c in b["captions"]])
    references.append(trainer.bank.current)
    trainer.update(batches)
    trainer.step += 1
    trainer.bank.add(trainer.step, lora_state_dict(trainer.model.trainable))
flat = torch.cat([p.detach().flatten() for p in trainer.params])
gathered = acc.gather(flat[None])
out = {"world": acc.num_processes, "weights_equal": bool(torch.equal(gathered[0], gathered[1])),
       "captions": captions, "references": references}
with open(sys.argv[2] + f"/seppo_rank{acc.process_index}.json", "w") as f:
    json.dump(out, f)
run_setup.end_training(acc)
run_setup.exit_process(0)
'''


@pytest.mark.slow
def test_two_process_seppo_shares_references_and_splits_data(tiny_dir, tmp_path):
    from diffrl.models.tiny import save_preferences

    script = tmp_path / "seppo_ddp.py"
    script.write_text(SEPPO_SCRIPT)
    data = save_preferences(tmp_path / "prefs", num_rows=8)
    result = accelerate_launch(script, tiny_dir("sd15"), tmp_path, data)
    assert result.returncode == 0, result.stderr[-6000:]
    rows = [json.loads((tmp_path / f"seppo_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(row["world"] == 2 and row["weights_equal"] for row in rows)
    assert rows[0]["references"] == rows[1]["references"]          # one reference draw for every process
    for step in range(3):                                           # 2 micro-batches x 1 winner per rank
        assert len(rows[0]["captions"][step]) == 2 and rows[0]["captions"][step] != rows[1]["captions"][step]


IGPO_SCRIPT = r'''
import json, sys, torch
from diffrl.trainers import load_config
from diffrl.trainers.igpo import IGPOTrainer
from diffrl.training import run_setup

config = load_config("configs/igpo/tiny_arithmetic.yaml", [f"model.path={sys.argv[1]}", f"output_dir={sys.argv[2]}/run",
                     "logging.progress_bar=false", "data.eval_size=2", "prompts_per_step=2", "train_batch_size=4"])
trainer = IGPOTrainer(config)
trainer.setup()
acc = trainer.accelerator
fired = []
for _ in range(2):
    batch = trainer.rollout()
    if acc.process_index == 1:      # rank 1's group is never all wrong: inpainting fires on rank 0 only
        task = batch["tasks"][0]
        right = trainer.model.tokenizer(task.target, add_special_tokens=False).input_ids
        batch["completions"][0] = trainer.model.tokenizer.eos_token_id
        batch["completions"][0, :len(right)] = torch.tensor(right)
    stats = trainer.score(batch)
    fired.append(stats["inpaint/groups"])
    trainer.update(batch)
    trainer.step += 1
flat = torch.cat([p.detach().flatten() for p in trainer.params])
gathered = acc.gather(flat[None])
out = {"world": acc.num_processes, "weights_equal": bool(torch.equal(gathered[0], gathered[1])), "fired": fired}
with open(sys.argv[2] + f"/igpo_rank{acc.process_index}.json", "w") as f:
    json.dump(out, f)
run_setup.end_training(acc)
run_setup.exit_process(0)
'''


@pytest.mark.slow
def test_two_process_igpo_with_inpainting_on_one_rank_only(tiny_dir, tmp_path):
    script = tmp_path / "igpo_ddp.py"
    script.write_text(IGPO_SCRIPT)
    result = accelerate_launch(script, tiny_dir("dllm"), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    rows = [json.loads((tmp_path / f"igpo_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(row["world"] == 2 and row["weights_equal"] for row in rows)
    assert rows[0]["fired"] == rows[1]["fired"] == [0.5, 0.5]   # the mean over ranks: 1 group on rank 0, 0 on 1
