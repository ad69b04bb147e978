"""Mixed precision and memory layout for a unit's training steps: `train.precision`,
`train.channels_last`, `train.compile` (per teacher, student, heads and neighbourhood parts).

    fp32   every step in float32 (the default)
    bf16   forward and losses under torch.autocast with bfloat16: no loss scaling needed
    fp16   the same with float16, and torch.amp.GradScaler scaling the loss so small gradients
           do not underflow; the scaler's state is checkpointed with the unit, so a resumed run
           goes on with the scale it had

The model's forward runs under autocast; raykd's loss functions compute in float32 whatever
their inputs' precision (raykd.losses.in_fp32: on CPU autocast leaves a temperature softmax in
bfloat16, which put KD off by a fifth on a test batch); evaluation and the exported model stay
float32. `channels_last` puts the trainable module and its image batches in NHWC layout, which
tensor cores prefer; `compile` compiles the trainable module's forward with torch.compile (where
a unit kind calls it: students and their methods' modules).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepPrecision:
    def __init__(self, optim, device: torch.device):
        self.dtype = DTYPES.get(optim.precision)
        self.device_type = device.type
        self.channels_last = optim.channels_last
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=optim.precision == "fp16")

    def prepare(self, module: torch.nn.Module, compile_it: bool) -> torch.nn.Module:
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if compile_it:
            module.compile()      # in place: its state_dict keys stay those of the module
        return module

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def batch(self, batch: tuple) -> tuple:
        """An image batch in the layout the module is in."""
        x = batch[0]
        if self.channels_last and torch.is_tensor(x) and x.dim() == 4:
            return (x.contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    def step(self, loss: torch.Tensor, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
