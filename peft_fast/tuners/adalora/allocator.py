"""AdaLoRA's rank allocator (HF peft's RankAllocator, same arithmetic in the same order, so the
same gradients give the same masks and budgets).

Importance of every entry of A, E and B: `|p · grad|`, smoothed by an EMA (beta1) and scaled
by an EMA of its deviation (beta2, the uncertainty). A triplet's score is its E entry's plus
the means of its A row and B column. Every `deltaT` steps during the budgeting phase, the
lowest-scoring triplets beyond the current budget get E = 0. Names are those of
`model.named_parameters()` of the wrapped transformers model (`...q_proj.lora_E.default`)."""

from __future__ import annotations

import torch
from torch import nn

from .config import AdaLoraConfig


class RankAllocator:
    """Budget schedule, importance scores and masks for the trainable AdaLoRA adapter."""

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig, adapter_name: str) -> None:
        self.peft_config = peft_config
        self.adapter_name = adapter_name
        self.beta1 = peft_config.beta1
        self.beta2 = peft_config.beta2
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        self.init_bgt = 0
        names = set()
        for n, p in model.named_parameters():
            if f"lora_A.{self.adapter_name}" in n:
                self.init_bgt += p.size(0)
                names.add(n.replace("lora_A", "%s"))
        self.name_set = sorted(names)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask) at `step`."""
        tinit, tfinal, total_step = self.peft_config.tinit, self.peft_config.tfinal, self.peft_config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.peft_config.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        """Fold this step's gradients into the sensitivity and uncertainty EMAs.

        HF peft's arithmetic, op for op (the same roundings, so the same bits), run as a few
        `torch._foreach_*` calls over all of the adapter's parameters instead of ten ops each."""
        names, params, grads = [], [], []
        for n, p in model.named_parameters():
            if "lora_" in n and self.adapter_name in n:
                if p.grad is None:
                    raise ValueError(
                        f"update_and_allocate needs the gradients of this step: {n} has none; call it after"
                        " loss.backward() and before optimizer.zero_grad()"
                    )
                if n not in self.ipt:
                    self.exp_avg_ipt[n] = torch.zeros_like(p, requires_grad=False)
                    self.exp_avg_unc[n] = torch.zeros_like(p, requires_grad=False)
                names.append(n)
                params.append(p.detach())
                grads.append(p.grad)
        if not names:
            return
        with torch.no_grad():
            ipt = torch._foreach_mul(params, grads)  # |p · grad|
            torch._foreach_abs_(ipt)
            avg = [self.exp_avg_ipt[n] for n in names]
            unc = [self.exp_avg_unc[n] for n in names]
            # exp_avg_ipt = beta1 · exp_avg_ipt + (1 − beta1) · ipt
            torch._foreach_mul_(avg, self.beta1)
            torch._foreach_add_(avg, torch._foreach_mul(ipt, 1 - self.beta1))
            # exp_avg_unc = beta2 · exp_avg_unc + (1 − beta2) · |ipt − exp_avg_ipt|
            dev = torch._foreach_sub(ipt, avg)
            torch._foreach_abs_(dev)
            torch._foreach_mul_(dev, 1 - self.beta2)
            torch._foreach_mul_(unc, self.beta2)
            torch._foreach_add_(unc, dev)
        self.ipt.update(zip(names, ipt))

    def _element_score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of the lowest-scoring triplets so that `budget` remain; returns
        the rank pattern {lora_E name: [kept, ...]}."""
        value_ipt: dict[str, torch.Tensor] = {}
        vector_ipt: dict[str, list[torch.Tensor]] = {}
        for n, _ in model.named_parameters():
            if f"lora_A.{self.adapter_name}" in n:
                vector_ipt.setdefault(n.replace("lora_A", "%s"), []).append(
                    torch.mean(self._element_score(n), dim=1, keepdim=True)
                )
            if f"lora_B.{self.adapter_name}" in n:
                vector_ipt.setdefault(n.replace("lora_B", "%s"), []).append(
                    torch.mean(self._element_score(n), dim=0, keepdim=False).view(-1, 1)
                )
            if f"lora_E.{self.adapter_name}" in n:
                value_ipt[n.replace("lora_E", "%s")] = self._element_score(n)
        triplet_ipt: dict[str, torch.Tensor] = {}
        all_score = []
        for name_m, vectors in vector_ipt.items():
            sum_ipt = value_ipt[name_m].view(-1) + torch.cat(vectors, dim=1).sum(dim=1).view(-1)
            triplet_ipt[name_m % "lora_E"] = sum_ipt.view(-1, 1)
            all_score.append(sum_ipt.view(-1))
        mask_threshold = torch.kthvalue(torch.cat(all_score), k=self.init_bgt - budget)[0].item()
        rank_pattern: dict[str, list[bool]] = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{self.adapter_name}" in n:
                    p.masked_fill_(triplet_ipt[n] <= mask_threshold, 0.0)
                    rank_pattern[n] = (~(triplet_ipt[n] <= mask_threshold)).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(
        self, model: nn.Module, global_step: int, force_mask: bool = False
    ) -> tuple[int, dict[str, list[bool]] | None]:
        """Update the scores (before the final phase), then mask where the schedule says so."""
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(model)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if mask_ind or force_mask else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero the E entries the rank pattern prunes (keys with or without the adapter name)."""
        truncated = self.adapter_name not in next(iter(rank_pattern.keys()))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{self.adapter_name}" in n:
                    key = n.replace(f".{self.adapter_name}", "") if truncated else n
                    mask = torch.tensor(rank_pattern[key], dtype=torch.bool, device=p.device).unsqueeze(-1)
                    p.masked_fill_(~mask, 0.0)
