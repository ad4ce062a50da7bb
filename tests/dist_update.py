"""A worker for tests/test_distributed.py, started on each rank by torchrun: one RL ``update`` of this
rank's half of a 16-completion batch under DDP (gloo); rank 0 saves the all-reduced gradient. With a
third argument ``nan``, rank 0's first micro-batch has a non-finite loss: each rank saves what
``update`` returned (both must return: the other rank waits in the gradients' all-reduce)."""

import sys

import torch

from conftest import make_tiny_model, random_rl_batch
from posttrain.trainers.rl import Batch, RLConfig, update
from posttrain.trainers.run import make_accelerator

out, loss_type = sys.argv[1], sys.argv[2]
nan = sys.argv[3:] == ["nan"]
acc = make_accelerator()
model = make_tiny_model(384).train()
full = random_rl_batch(384, n=16)
half = slice(8 * acc.process_index, 8 * (acc.process_index + 1))
batch = Batch(full.input_ids[half], full.attention_mask[half], full.completion_mask[half], full.advantages[half],
              ref_logp=full.ref_logp[half])
cfg = RLConfig(algo="grpo", loss_type=loss_type, beta=0.1, num_generations=4, per_device_batch_size=4,
               gradient_accumulation_steps=2, max_new_tokens=8)
if nan and acc.process_index == 0:
    batch.ref_logp[:4] = float("nan")
ddp = acc.prepare(model)
finite, stats = update(ddp, batch, cfg, acc)
if nan:
    torch.save({"finite": finite, "stats": stats}, f"{out}.{acc.process_index}")
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()
    sys.exit(0)
assert finite
if acc.is_main_process:
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "stats": stats}, out)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
