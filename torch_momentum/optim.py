r"""Heavy-ball (:class:`PolyakSGD`) and Nesterov (:class:`NesterovSGD`) momentum in velocity form.

Both are thin :class:`torch.optim.Optimizer` subclasses over the shared kernel
:func:`torch_momentum.functional.momentum_sgd`; see that module for the mathematics of each path.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _use_grad_for_differentiable

from torch_momentum._hyperparameters import check_hyperparameters
from torch_momentum._kernels import (
    Implementation,
    check_sparse_grads,
    foreach_supported,
    resolve_implementation,
    run_kernel,
    scalar_lr,
)
from torch_momentum.functional import lookahead_shift

__all__ = ["NesterovSGD", "PolyakSGD", "to_sgd_state_dict"]


_SGD_ONLY_KEYS = ("nesterov", "dampening")


def _is_sgd_state_dict(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` comes from ``torch.optim.SGD`` (its group keys or buffers)."""
    return any(k in g for g in state_dict.get("param_groups", []) for k in _SGD_ONLY_KEYS) or any(
        "momentum_buffer" in s for s in state_dict.get("state", {}).values()
    )


class _MomentumSGD(Optimizer):
    """Shared constructor, validation, state handling and step of both optimisers."""

    _nesterov: bool = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "differentiable": differentiable,
        }
        defaults.update(check_hyperparameters(defaults))
        defaults.update(self._extra_defaults())
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        """Forget everything derived from the param groups between steps (the resolved update
        paths); called by the constructor and after unpickling."""
        self._paths: dict[int, tuple[tuple[Any, ...], Implementation]] = {}

    def _extra_defaults(self) -> dict[str, Any]:
        return {}

    def _migrated_group_keys(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keys this class adds to a param group migrated from ``torch.optim.SGD``."""
        return {}

    def _from_sgd(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A ``torch.optim.SGD`` state dict in this class's terms (velocity = -momentum_buffer)."""
        name = type(self).__name__
        groups = []
        for i, group in enumerate(state_dict["param_groups"]):
            where = f"torch.optim.SGD state dict, param group {i}: "
            group = dict(group)
            dampening = group.pop("dampening", 0)
            if dampening != 0:
                raise ValueError(
                    f"{where}key 'dampening' is {dampening!r}, but {name} has no dampening; "
                    "only dampening=0 can be loaded"
                )
            nesterov = group.pop("nesterov", False)
            if bool(nesterov) != self._nesterov:
                other = "NesterovSGD" if nesterov else "PolyakSGD"
                raise ValueError(
                    f"{where}key 'nesterov' is {nesterov!r}: that state continues in {other}, "
                    f"not in {name}"
                )
            group.update(check_hyperparameters(group, where))
            group.update(self._migrated_group_keys(group))
            groups.append(group)
        state = {}
        for key, entry in state_dict["state"].items():
            entry = dict(entry)
            buffer = entry.pop("momentum_buffer", None)
            if buffer is not None:
                entry["velocity"] = torch.neg(buffer)
            state[key] = entry
        return {**state_dict, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        r"""Load a state dict of this class, or migrate one of ``torch.optim.SGD``.

        A ``torch.optim.SGD`` state dict (``dampening=0``; ``nesterov=False`` for PolyakSGD,
        ``nesterov=True`` for NesterovSGD) is converted with velocity :math:`= -` momentum
        buffer, so that the trajectory continues exactly as the built-in's would.
        :func:`to_sgd_state_dict` is the way back.

        Raises:
            ValueError: a key that does not fit this class (``nesterov``, ``dampening``, an
                invalid hyper-parameter, unknown per-parameter state), before anything changes.

        Example:
            >>> import torch
            >>> from torch_momentum import PolyakSGD
            >>> p = torch.nn.Parameter(torch.tensor([1.0]))
            >>> sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
            >>> p.grad = torch.tensor([2.0]); sgd.step()
            >>> opt = PolyakSGD([p], lr=0.1, momentum=0.9)
            >>> opt.load_state_dict(sgd.state_dict())
            >>> opt.state[p]["velocity"]
            tensor([-2.])
        """
        if _is_sgd_state_dict(state_dict):
            state_dict = self._from_sgd(state_dict)
        name = type(self).__name__
        for i, group in enumerate(state_dict["param_groups"]):
            if not self._nesterov and ("lookahead" in group or "train_mode" in group):
                raise ValueError(
                    f"param group {i}: key 'train_mode' belongs to a NesterovSGD state dict "
                    f"(its parameters are look-ahead points); load it into NesterovSGD, not {name}"
                )
        for key, entry in state_dict["state"].items():
            unknown = sorted(set(entry) - {"velocity"})
            if unknown:  # every unknown key, sorted: the message does not depend on set order
                raise ValueError(
                    f"state of parameter {key}: unknown key(s) {', '.join(map(repr, unknown))}; "
                    f"{name} keeps only "
                    "'velocity' (and migrates 'momentum_buffer' from torch.optim.SGD)"
                )
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the fused kernel wants velocities in the param layout
            for p in group["params"]:
                v = self.state.get(p, {}).get("velocity")
                if v is not None and v.layout is torch.strided and v.stride() != p.stride():
                    like = torch.empty_like(p, memory_format=torch.preserve_format)
                    if like.stride() != v.stride():
                        self.state[p]["velocity"] = like.copy_(v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after validating its hyper-parameters (as the constructor's
        arguments); on an error nothing is changed. ``fused=True`` is checked at ``step()``, as the
        built-in does, so that parameters built on the meta device can be materialised first."""
        where = f"param group {len(self.param_groups)}: "
        merged = {**self.defaults, **param_group}
        param_group = {**param_group, **check_hyperparameters(merged, where)}
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Older state dicts may lack flags added later: fill them with the defaults.
        super().__setstate__(state)
        self._reset_caches()
        for group in self.param_groups:
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("differentiable", False)
            for key, value in self._extra_defaults().items():
                group.setdefault(key, value)

    def _collect_group(
        self, group: dict[str, Any], index: int
    ) -> tuple[list[Tensor], list[Tensor], bool]:
        """The parameters with a gradient, their gradients, and whether one is sparse (sparse
        gradients are supported as the built-in supports them: not with weight decay)."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
        where = f"{type(self).__name__}: param group {index}: "
        return params, grads, check_sparse_grads(grads, group["weight_decay"], where)

    def _velocities_of(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        """The velocities of ``params``, created as zeros in the parameter's layout (sparse zeros
        for a sparse gradient: the velocity then stays sparse, as the built-in's buffer does)."""
        if group["momentum"] == 0:
            return []
        velocities = []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            if "velocity" not in state:
                state["velocity"] = (
                    torch.zeros_like(g)
                    if g.is_sparse
                    else torch.zeros_like(p, memory_format=torch.preserve_format)
                )
            velocities.append(state["velocity"])
        return velocities

    def _prepare_group(
        self, index: int, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        """Hook run before a group's update; returns the gradients to use (NesterovSGD re-bases
        its look-ahead here)."""
        return grads

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Raises:
            RuntimeError: ``fused=True`` with a parameter the fused kernel cannot update, or a
                sparse gradient with ``weight_decay != 0`` (both checked for every group before
                anything changes).
        """
        self._check_can_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for index, group in enumerate(self.param_groups):
            params, grads, has_sparse_grad = self._collect_group(group, index)
            path = self._implementation(index, group) if params else "forloop"
            work.append((index, group, params, grads, has_sparse_grad, path))
        for index, group, params, grads, has_sparse_grad, path in work:
            velocities = self._velocities_of(group, params, grads)
            grads = self._prepare_group(index, group, params, grads)
            if not params:
                continue
            run_kernel(
                path,
                params,
                grads,
                velocities,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                nesterov=self._nesterov,
                has_sparse_grad=has_sparse_grad,
                differentiable=group["differentiable"],
            )
            if group["differentiable"] and velocities:  # the kernel made new velocity tensors
                for p, v in zip(params, velocities, strict=True):
                    self.state[p]["velocity"] = v
        return loss

    def _implementation(self, index: int, group: dict[str, Any]) -> Implementation:
        """The update path of this group, from facts about its parameters that cannot change
        while the group's parameter list and flags stay the same (tensor types), resolved once
        (checking every tensor costs ~0.5 µs each, ~15 % of a fused step on a 1M-parameter list).
        Devices, dtypes and layouts, which can change between steps (``model.to(...)``, a new
        gradient), are checked by the fused kernel at every step."""
        flags = (group["foreach"], group["fused"], group["differentiable"])
        params = group["params"]
        where = f"{type(self).__name__}: param group {index}, "
        if torch.compiler.is_compiling():
            return resolve_implementation(params, *flags, where)
        key = (params, len(params), flags)
        cached = self._paths.get(index)
        if cached is not None and cached[0][0] is key[0] and cached[0][1:] == key[1:]:
            return cached[1]
        path = resolve_implementation(params, *flags, where)  # raises before anything is cached
        self._paths[index] = (key, path)
        return path

    def _check_can_step(self) -> None:
        """Raise if a step is not allowed now (NesterovSGD in eval mode)."""

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(
            f"iterate: the tensor of shape {tuple(p.shape)} is not a parameter of this "
            f"{type(self).__name__}"
        )

    def _param_group(self, group: dict[str, Any] | int) -> dict[str, Any]:
        """One of this optimiser's param groups, given as the dict itself or its index."""
        if isinstance(group, dict):
            if any(g is group for g in self.param_groups):
                return group
            raise ValueError(
                f"group: the dict given is not one of this {type(self).__name__}'s param_groups "
                "(pass the group itself, e.g. opt.param_groups[0], or its index)"
            )
        if isinstance(group, bool) or not isinstance(group, numbers.Integral):
            raise TypeError(
                f"group must be a param group dict or its index, got {type(group).__name__}"
            )
        if not -len(self.param_groups) <= int(group) < len(self.param_groups):
            raise ValueError(
                f"group={group} is out of range: this {type(self).__name__} has "
                f"{len(self.param_groups)} param group(s)"
            )
        return self.param_groups[int(group)]

    def lookahead_coefficient(self, group: dict[str, Any] | int) -> float | Tensor:
        r"""The coefficient :math:`c` with parameters :math:`= x + c\,v` in ``group`` now.

        :math:`c = 0` for :class:`PolyakSGD` (the parameters are the iterate) and for
        :class:`NesterovSGD` in eval mode; in training mode NesterovSGD's parameters hold the
        look-ahead :math:`y = x + c\,v` with :math:`c = \eta\mu` as of the last step (or as
        of now before the first step). :meth:`iterate` subtracts exactly :math:`c\,v`.

        Args:
            group: one of ``param_groups`` (the dict itself) or its index.

        Returns:
            A float, or a 0-dim Tensor when ``lr`` is a Tensor (not read on the host).

        Raises:
            TypeError / ValueError: ``group`` is neither an index nor one of ``param_groups``.

        Example:
            >>> import torch
            >>> from torch_momentum import NesterovSGD
            >>> opt = NesterovSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5, momentum=0.5)
            >>> opt.lookahead_coefficient(0), opt.eval().lookahead_coefficient(0)
            (0.25, 0.0)
        """
        self._param_group(group)
        return 0.0

    @torch.no_grad()
    def iterate(self, p: Tensor) -> Tensor:
        r"""The iterate :math:`x_t` of parameter ``p`` as a new tensor; nothing is moved.

        PolyakSGD (and NesterovSGD in eval mode): a copy of ``p``. NesterovSGD in training mode:
        :math:`x_t = y_t - c\,v_t` with the look-ahead coefficient :math:`c` in force.

        Raises:
            ValueError: ``p`` is not a parameter of this optimiser.

        Example:
            >>> import torch
            >>> from torch_momentum import NesterovSGD
            >>> p = torch.nn.Parameter(torch.tensor([2.0]))
            >>> opt = NesterovSGD([p], lr=0.5, momentum=0.5)
            >>> p.grad = torch.tensor([1.0]); opt.step()
            >>> opt.iterate(p), p.detach()  # x_1 = 2 - 0.5; y_1 = x_1 + 0.25 * (-1)
            (tensor([1.5000]), tensor([1.2500]))
        """
        group = self._group_of(p)
        velocity = self.state.get(p, {}).get("velocity")
        coefficient = self.lookahead_coefficient(group)
        if velocity is None or (not isinstance(coefficient, Tensor) and coefficient == 0):
            return p.detach().clone()
        if isinstance(coefficient, Tensor):
            return p.detach() - coefficient * velocity
        return p.detach().add(velocity, alpha=-coefficient)  # the rounding of eval()


class PolyakSGD(_MomentumSGD):
    r"""Heavy-ball momentum (Polyak 1964), written velocity first.

    With :math:`d_t = \nabla f(x_t) + \lambda x_t` (:math:`-\nabla f(x_t) + \lambda x_t` when
    ``maximize``), learning rate :math:`\eta`, momentum :math:`\mu`, weight decay :math:`\lambda`:

    .. math::
        v_{t+1} = -d_t + \mu v_t, \qquad x_{t+1} = x_t + \eta\, v_{t+1}, \qquad v_0 = 0.

    ``state[p]["velocity"]`` is :math:`v` in exactly this sign convention (kept only while
    ``momentum > 0``; ``momentum=0`` is plain gradient descent). The iterates coincide with
    ``torch.optim.SGD(lr, momentum, weight_decay=..., maximize=...)`` and
    ``velocity == -momentum_buffer``, also under LR schedulers.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\eta \ge 0` (a float or a 1-element Tensor).
        momentum: :math:`\mu \in [0, 1)`.
        weight_decay: :math:`\lambda \ge 0` (L2 penalty added to the gradient).
        maximize: maximise the objective instead of minimising it.
        foreach: use the multi-tensor ``torch._foreach_*`` path.
        fused: use the fused single-pass kernel.
        differentiable: let autograd differentiate through the step (reference path only).

    With ``foreach=None, fused=None`` the update takes the path ``torch.optim.SGD`` takes by
    default on the same tensors, so that the results are the built-in's bit for bit: the for-loop
    on the CPU, ``foreach`` on CUDA and other devices with foreach kernels, the for-loop for
    ``differentiable=True`` (see :mod:`torch_momentum.functional`). ``fused=True`` (the fastest
    on large models, one memory pass) and ``foreach=True`` are available on request; they round
    differently. Sparse gradients (``nn.Embedding(sparse=True)``) are supported as the built-in
    supports them: the velocity of such a parameter is sparse like the built-in's momentum
    buffer, and ``weight_decay`` must be 0 for it. ``load_state_dict`` also takes a
    ``torch.optim.SGD(momentum=m)`` state dict; :func:`to_sgd_state_dict` is the way back.

    Example:
        >>> import torch
        >>> from torch_momentum import PolyakSGD
        >>> p = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = PolyakSGD([p], lr=0.1, momentum=0.9)
        >>> for _ in range(2):
        ...     p.grad = torch.tensor([1.0]); opt.step()
        >>> opt.state[p]["velocity"], p.detach()  # v: -1, then -1 + 0.9 * -1
        (tensor([-1.9000]), tensor([0.7100]))
    """


class NesterovSGD(_MomentumSGD):
    r"""Nesterov momentum in velocity form: the gradient is taken at the look-ahead point.

    With iterate :math:`x_t`, velocity :math:`v_t` (:math:`v_0 = 0`), learning rate :math:`\eta`,
    momentum :math:`\mu` and look-ahead :math:`y_t = x_t + \eta\mu v_t`:

    .. math::
        v_{t+1} = -d(y_t) + \mu v_t, \qquad x_{t+1} = x_t + \eta\, v_{t+1},

    where :math:`d(y) = \nabla f(y) + \lambda y` (:math:`-\nabla f(y) + \lambda y` when maximising).

    **Where the parameters are.** In training mode (the default) the parameters hold
    :math:`y_t`, so an ordinary ``loss.backward(); opt.step()`` loop evaluates the gradient at the
    look-ahead point; ``step()`` leaves them at :math:`y_{t+1}`. :meth:`eval` moves them to the
    iterate :math:`x_t` (for validation, checkpoint averaging, reporting), :meth:`train` moves them
    back; both are idempotent and the mode (``param_groups[i]["train_mode"]``) is saved in
    ``state_dict()``. ``step()`` in eval mode raises a :class:`RuntimeError`.

    **Equivalence.** With a constant :math:`\eta\mu` the parameters coincide with
    ``torch.optim.SGD(lr, momentum, nesterov=True)``'s, and ``velocity == -momentum_buffer``.

    **Schedulers.** The look-ahead is built with the coefficient :math:`\eta\mu` in force at the
    previous step; it is remembered in ``param_groups[i]["lookahead"]``. :meth:`eval` subtracts
    exactly that coefficient, so it returns :math:`x_t` also after a scheduler changed ``lr``. When
    ``lr`` or ``momentum`` changed, the next ``step()`` first moves the parameters by
    :math:`(\eta_{new}\mu_{new} - \eta_{old}\mu_{old})v_t` (the gradient has already been taken at
    the old look-ahead) and then updates, so :math:`x_{t+1} = x_t + \eta_{new} v_{t+1}` holds
    exactly. ``torch.optim.SGD(nesterov=True)`` instead keeps its parameters and so silently moves
    its implied iterate by that amount; the two therefore differ after each change of
    :math:`\eta\mu`, by exactly that term.

    Args: as :class:`PolyakSGD`.

    Example:
        >>> import torch
        >>> from torch_momentum import NesterovSGD
        >>> p = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = NesterovSGD([p], lr=0.1, momentum=0.5)
        >>> p.grad = torch.tensor([1.0]); opt.step()
        >>> p.detach(), opt.iterate(p)  # y_1 = x_1 + 0.05 * v_1 with x_1 = 0.9, v_1 = -1
        (tensor([0.8500]), tensor([0.9000]))
        >>> opt.eval().training, p.detach()
        (False, tensor([0.9000]))
    """

    _nesterov = True

    def _extra_defaults(self) -> dict[str, Any]:
        # lookahead: the coefficient c with params = x + c * v (None: lr * momentum, no step yet).
        return {"train_mode": True, "lookahead": None}

    def _reset_caches(self) -> None:
        super()._reset_caches()
        # per group: (id, version, momentum) of a device Tensor lr at the last step
        self._lr_stamps: dict[int, tuple[int, int, float]] = {}

    def _migrated_group_keys(self, group: dict[str, Any]) -> dict[str, Any]:
        # The built-in's parameters are its look-ahead, built with the current lr * momentum: no
        # re-base at the next step, so the trajectory continues exactly as the built-in's would.
        coefficient = self._coefficient(group)
        if isinstance(coefficient, Tensor):
            coefficient = coefficient.detach().clone()
        return {"train_mode": True, "lookahead": coefficient}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; it joins in the optimiser's current mode (its new parameters have
        no velocity yet, so x = y for them and nothing moves)."""
        if self.param_groups and "train_mode" not in param_group:
            param_group = {**param_group, "train_mode": self.training}
        super().add_param_group(param_group)

    @staticmethod
    def _coefficient(group: dict[str, Any]) -> float | Tensor:
        return scalar_lr(group["lr"]) * group["momentum"]

    def _velocities(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params, velocities = [], []
        for p in group["params"]:
            v = self.state.get(p, {}).get("velocity")
            if v is not None:
                params.append(p)
                velocities.append(v)
        return params, velocities

    @staticmethod
    def _can_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
        return not group["differentiable"] and all(foreach_supported(p) for p in params)

    def _shift(self, group: dict[str, Any], alpha: float | Tensor) -> None:
        params, velocities = self._velocities(group)
        lookahead_shift(params, velocities, alpha, foreach=self._can_foreach(group, params))

    def lookahead_coefficient(self, group: dict[str, Any] | int) -> float | Tensor:
        group = self._param_group(group)
        if not group["train_mode"]:
            return 0.0
        return self._built_with(group)

    def _built_with(self, group: dict[str, Any]) -> float | Tensor:
        """The coefficient the look-ahead of ``group`` is (or, in eval mode, will be) built with:
        ``lr * momentum`` as of the last step, or as of now before the first step."""
        coefficient = group["lookahead"]
        return self._coefficient(group) if coefficient is None else coefficient

    def _check_can_step(self) -> None:
        for index, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(
                    f"NesterovSGD.step() was called in eval mode (param group {index}): the "
                    "parameters hold the iterate x_t, not the look-ahead point. Call "
                    "optimizer.train() before training steps."
                )

    def _lookahead_changed(self, index: int, group: dict[str, Any], delta: float | Tensor) -> bool:
        """Whether the coefficient ημ changed since the look-ahead was built, without a host
        synchronisation: on the CPU compare; for a device Tensor lr compare its identity and
        version counter (schedulers update it in place) and the momentum."""
        if not isinstance(delta, Tensor):
            return delta != 0
        if delta.device.type == "cpu":
            return bool(delta != 0)
        lr = group["lr"]
        stamp = (id(lr), lr._version, group["momentum"])
        changed = self._lr_stamps.get(index) != stamp
        self._lr_stamps[index] = stamp
        return changed

    def _prepare_group(
        self, index: int, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        r"""Re-base the look-ahead when :math:`\eta\mu` changed: :math:`p \leftarrow p + \delta v`
        with :math:`\delta = \eta_{new}\mu_{new} - c`. The kernel then computes the decay term of
        :math:`d` from the moved parameters, so the gradients are corrected by
        :math:`\mp\lambda\delta v` to keep :math:`d = \pm\nabla f(y_t) + \lambda y_t` at the point
        the gradient was taken (a temporary only on such steps)."""
        target = self._coefficient(group)
        current = group["lookahead"]
        if current is not None:
            delta = target - current
            if self._lookahead_changed(index, group, delta):
                if group["weight_decay"] != 0 and grads:
                    scale = group["weight_decay"] * (1.0 if group["maximize"] else -1.0)
                    velocities = [self.state.get(p, {}).get("velocity") for p in params]
                    grads = [
                        g if v is None else g + (scale * delta) * v
                        for g, v in zip(grads, velocities, strict=True)
                    ]
                self._shift(group, delta)
        group["lookahead"] = target.detach().clone() if isinstance(target, Tensor) else target
        return grads

    @torch.no_grad()
    def eval(self) -> NesterovSGD:
        r"""Put the parameters at the iterate :math:`x_t = y_t - c\,v_t` (idempotent).

        ``c`` is the coefficient :math:`\eta\mu` the look-ahead was built with, so this is exact
        also after a scheduler changed ``lr``. Returns ``self``.
        """
        return self._move(train=False)

    @torch.no_grad()
    def train(self, mode: bool = True) -> NesterovSGD:
        r"""Put the parameters back at the look-ahead :math:`y_t = x_t + c\,v_t` (idempotent).

        ``train(False)`` is ``eval()``, as for :meth:`torch.nn.Module.train`. Returns ``self``.
        """
        return self._move(train=mode)

    def _move(self, train: bool) -> NesterovSGD:
        r"""Move every group not yet in the requested mode by :math:`\pm c\,v` (``c`` the
        coefficient its look-ahead is built with, which is then remembered)."""
        for group in self.param_groups:
            if group["train_mode"] != train:
                coefficient = self._built_with(group)
                self._shift(group, coefficient if train else -coefficient)
                group["lookahead"] = coefficient
                group["train_mode"] = train
        return self

    @property
    def training(self) -> bool:
        """Whether every param group is in training mode (parameters at the look-ahead)."""
        return all(group["train_mode"] for group in self.param_groups)


def to_sgd_state_dict(optimizer: PolyakSGD | NesterovSGD) -> dict[str, Any]:
    r"""A state dict that ``torch.optim.SGD`` loads and continues exactly from.

    ``momentum_buffer`` :math:`= -v`, ``dampening=0``, ``nesterov`` as the class. For NesterovSGD
    the built-in's parameters must be the look-ahead :math:`y_t`, which the parameters hold in
    training mode; the built-in then takes the same steps as long as :math:`\eta\mu` equals the
    coefficient the look-ahead was built with. If a scheduler changed it after the last step, the
    built-in continues without the re-base NesterovSGD would do (a warning says so: the two
    differ by :math:`(\eta_{new}\mu_{new} - c)\,v_t`, as they do under schedulers anyway).

    Args:
        optimizer: a :class:`PolyakSGD` or :class:`NesterovSGD`.

    Returns:
        A new state dict (fresh buffers; the optimiser is not changed).

    Raises:
        TypeError: ``optimizer`` is neither class.
        RuntimeError: a NesterovSGD in eval mode (parameters at :math:`x_t`); call ``train()``.

    Example:
        >>> import torch
        >>> from torch_momentum import NesterovSGD, to_sgd_state_dict
        >>> p = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = NesterovSGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.tensor([2.0]); opt.step()
        >>> sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
        >>> sgd.load_state_dict(to_sgd_state_dict(opt))
        >>> sgd.state[p]["momentum_buffer"]
        tensor([2.])
    """
    if not isinstance(optimizer, _MomentumSGD):
        raise TypeError(
            f"to_sgd_state_dict expects a PolyakSGD or NesterovSGD, got {type(optimizer).__name__}"
        )
    nesterov = optimizer._nesterov
    if isinstance(optimizer, NesterovSGD) and not optimizer.training:
        raise RuntimeError(
            "to_sgd_state_dict: the NesterovSGD is in eval mode, its parameters hold the iterate "
            "x_t, while torch.optim.SGD(nesterov=True) keeps the look-ahead y_t; call "
            "optimizer.train() first (and save the model weights after it)"
        )
    state_dict = optimizer.state_dict()
    groups = []
    for i, group in enumerate(state_dict["param_groups"]):
        group = dict(group)
        group.pop("train_mode", None)
        lookahead = group.pop("lookahead", None)
        if nesterov and lookahead is not None:
            coefficient = NesterovSGD._coefficient(group)
            changed = coefficient != lookahead
            if bool(changed.any() if isinstance(changed, Tensor) else changed):
                warnings.warn(
                    f"to_sgd_state_dict: param group {i}: lr * momentum changed since the last "
                    "step; torch.optim.SGD(nesterov=True) continues without NesterovSGD's "
                    "look-ahead re-base, i.e. from a point that differs by "
                    "(lr * momentum - previous lr * momentum) * velocity",
                    stacklevel=2,
                )
        group["dampening"] = 0
        group["nesterov"] = nesterov
        groups.append(group)
    state = {
        key: {"momentum_buffer": torch.neg(entry["velocity"])}
        for key, entry in state_dict["state"].items()
        if "velocity" in entry
    }
    return {"state": state, "param_groups": groups}
