"""A worker for tests/test_distributed.py, started on each rank by torchrun: one RL ``update`` of this
rank's half of a 16-completion batch under DDP (gloo); rank 0 saves the all-reduced gradient."""

import sys

import torch

from conftest import make_tiny_model, random_rl_batch
from posttrain.trainers.rl import Batch, RLConfig, update
from posttrain.trainers.run import make_accelerator

out, loss_type = sys.argv[1], sys.argv[2]
acc = make_accelerator()
model = make_tiny_model(384).train()
full = random_rl_batch(384, n=16)
half = slice(8 * acc.process_index, 8 * (acc.process_index + 1))
batch = Batch(full.input_ids[half], full.attention_mask[half], full.completion_mask[half], full.advantages[half],
              ref_logp=full.ref_logp[half])
cfg = RLConfig(algo="grpo", loss_type=loss_type, beta=0.1, num_generations=4, per_device_batch_size=4,
               gradient_accumulation_steps=2, max_new_tokens=8)
ddp = acc.prepare(model)
finite, stats = update(ddp, batch, cfg, acc)
assert finite
if acc.is_main_process:
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "stats": stats}, out)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
