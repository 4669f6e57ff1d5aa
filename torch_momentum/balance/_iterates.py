r"""The iterate :math:`x_t` of parameters updated by optimisers, read the same way by the ledger
and the network watch.

A look-ahead optimiser's parameters are not its iterate: Nesterov keeps :math:`y = x + c\,v`.
The iterate is :math:`x = y - c\,v` with the coefficient :math:`c` the parameters were built
with. :class:`~torch_momentum.NesterovSGD` reports :math:`c` itself; ``torch.optim.SGD`` with
``nesterov=True`` builds :math:`y` with the step's :math:`\eta\mu`, which a scheduler may change
before the iterate is read, so the coefficient is recorded after every step (the rules'
``memory``, :meth:`~torch_momentum.balance.rules.Rule.record`).

Private module: the names here are shared by the ledger's modules, not user API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from torch_momentum.balance.rules import Rule, rule_for


class Iterates:
    """Who updates each parameter (optimiser and param group), each optimiser's rule, and the
    rules' memory of look-ahead coefficients, kept by step post-hooks (:meth:`attach`).

    Args:
        optimizers: the optimisers; a parameter listed by several is owned by the last.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        #: per optimiser (by id), its rule
        self.rules: dict[int, Rule] = {id(opt): rule_for(opt) for opt in self.optimizers}
        #: the rules' memory: ``(id(optimizer), group index) -> look-ahead coefficient``
        self.memory: dict[tuple[int, int], float] = {}
        self._owner = {
            id(p): (opt, g)
            for opt in self.optimizers
            for g, group in enumerate(opt.param_groups)
            for p in group["params"]
        }
        self._handles: list[Any] = []

    def owner(self, p: Tensor) -> tuple[torch.optim.Optimizer, int] | None:
        """``(optimizer, group index)`` updating ``p``, or None."""
        return self._owner.get(id(p))

    def iterate(self, p: Tensor) -> Tensor:
        """The iterate :math:`x_t` of ``p`` (``p`` detached where it is the iterate)."""
        owner = self._owner.get(id(p))
        if owner is None:
            return p.detach()
        opt, g = owner
        return self.rules[id(opt)].iterate(opt, g, p, self.memory)

    def attach(self) -> None:
        """Record the look-ahead coefficients after every step (idempotent; only optimisers
        whose rule records anything get a hook)."""
        if self._handles:
            return
        for opt in self.optimizers:
            if type(self.rules[id(opt)]).record is not Rule.record:
                self._handles.append(opt.register_step_post_hook(self._record))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        rule = self.rules[id(opt)]
        for g in range(len(opt.param_groups)):
            rule.record(opt, g, self.memory)

    def state_dict(self) -> list[list[Any]]:
        """The memory as ``[[optimizer index, group index], coefficient]`` rows."""
        index = {id(opt): k for k, opt in enumerate(self.optimizers)}
        return [[[index[o], g], value] for (o, g), value in self.memory.items()]

    def load_state_dict(self, rows: Sequence[Sequence[Any]]) -> None:
        """Restore the memory from :meth:`state_dict` rows (replacing it).

        Raises:
            ValueError: a row naming an optimiser or param group that is not there (a state
                saved with other optimisers); nothing is changed then.
        """
        memory = {}
        for (o, g), value in rows:
            if not (
                0 <= o < len(self.optimizers) and 0 <= g < len(self.optimizers[o].param_groups)
            ):
                raise ValueError(
                    f"the saved look-ahead state names optimizer {o}, param group {g}, which"
                    f" are not here ({len(self.optimizers)} optimizer(s)): saved with other"
                    " optimizers"
                )
            memory[(id(self.optimizers[o]), g)] = float(value)
        self.memory.clear()
        self.memory.update(memory)
