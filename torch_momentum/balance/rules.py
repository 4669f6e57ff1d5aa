r"""Update rules: how one optimiser family's step splits into the balance ledger's terms.

For any update :math:`x_{t+1} = x_t + \Delta x` and a signed inner product
:math:`\langle a, b\rangle_\pm` (over the tensors of a pair of layers, or of a unit),
:math:`D = \langle x, x\rangle_\pm` changes by exactly

.. math::
    D_{t+1} - D_t = 2\langle x_t, \Delta x\rangle_\pm + \|\Delta x\|^2_\pm .

A *rule* knows how its optimiser's step is built from the iterate :math:`x_t`, the velocity
:math:`v_t` and the gradient :math:`g_t` (learning rate :math:`\eta`, momentum :math:`\mu`,
weight decay :math:`\lambda`, :math:`s = -1` when maximising), so it can split the first-order
part into terms. Heavy ball (:math:`d_t = s g_t + \lambda x_t`, :math:`v_{t+1} = \mu v_t - d_t`,
:math:`\Delta x = \eta v_{t+1}`), with :math:`K_t = \langle x_t, v_t\rangle_\pm` and
:math:`R_t = \langle x_t, g_t\rangle_\pm`:

.. math::
    D_{t+1} - D_t = \underbrace{2\eta\mu K_t}_{\text{momentum}}
    \underbrace{- 2\eta\lambda D_t}_{\text{weight decay}}
    \underbrace{- 2\eta s R_t}_{\text{symmetry}}
    + \underbrace{\eta^2\|v_{t+1}\|^2_\pm}_{\text{discretisation}} .

Nesterov (gradient at :math:`y_t = x_t + c\,v_t`, :math:`D` on the iterate :math:`x`) adds
:math:`2\eta s c\langle v_t, g_t\rangle_\pm` to momentum, :math:`-2\eta\lambda cK_t` to weight
decay and :math:`-2\eta s c\langle v_t, g_t\rangle_\pm` to symmetry. Any other optimiser gets the
generic split: symmetry :math:`-2\eta s R_t` (the gradient's share, :math:`\eta` the group's
``lr``) and the rest of the first-order part in ``other``.

Each term is a linear combination of six entries of the Gram matrix of
:math:`(x_t, v_t, g_t, \Delta x)` (:data:`GRAM_ENTRIES`); :func:`term_coefficients` gives the
combination. The ledger reads each tensor's rows after the step (parameter, velocity, gradient:
no copies for the known rules) and a rule's :class:`Maps` recover :math:`(x_t, v_t, g_t, \Delta
x)` from them exactly.

One small object per family (:class:`HeavyBall` for :class:`~torch_momentum.PolyakSGD`,
:class:`Nesterov` for :class:`~torch_momentum.NesterovSGD`, :class:`TorchSGD` for
``torch.optim.SGD``, :class:`Generic` for everything else), looked up once per optimiser by
:func:`rule_for`; :func:`register_rule` adds a family.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from torch_momentum.optim import NesterovSGD, PolyakSGD

__all__ = [
    "GENERIC_RULE",
    "GRAM_ENTRIES",
    "LEDGER_TERMS",
    "SLOTS",
    "Generic",
    "HeavyBall",
    "Hyper",
    "Maps",
    "Nesterov",
    "Rule",
    "TorchSGD",
    "linear_coefficients",
    "register_rule",
    "rule_for",
    "term_coefficients",
]

#: The ledger's terms, in order: ``ledger/{term}/{L}-{M}``. ``rounding`` is the part of the
#: drift that the rounding of a low-precision (bfloat16/float16) update causes: the applied
#: update minus the exact one (0 in float32/float64, where rounding stays in the closure).
LEDGER_TERMS = ("momentum", "weight_decay", "symmetry", "discretisation", "other", "rounding")

# The canonical vectors of one step: the iterate x_t, the velocity v_t (velocity form:
# v <- mu v - grad), the gradient g_t, the exact update dx of the rule from them, and the
# rounding error e (the applied update minus dx; 0 unless the parameters are in low precision).
X, V, G, DX, E = range(5)
CANONICAL = 5

#: The Gram entries :math:`\langle a, b\rangle` of the canonical vectors
#: :math:`(x_t, v_t, g_t, \Delta x, e)` that the quadratic terms use, as index pairs:
#: :math:`D = \langle x, x\rangle`, :math:`K = \langle x, v\rangle`, :math:`\langle x, g\rangle`,
#: :math:`\langle v, g\rangle`, :math:`\langle x, \Delta x\rangle`,
#: :math:`\langle \Delta x, \Delta x\rangle`, :math:`\langle x, e\rangle`,
#: :math:`\langle \Delta x, e\rangle`, :math:`\langle e, e\rangle`.
GRAM_ENTRIES = ((X, X), (X, V), (X, G), (V, G), (X, DX), (DX, DX), (X, E), (DX, E), (E, E))

#: The ledger reads each updated tensor as up to five *slots*: after the step
#: ``(p_{t+1}, v_{t+1}, g_t)``, or, for the generic split, ``(x_t, p_{t+1}, g_t)``; for a
#: low-precision tensor of a known rule ``(p_t, v_t, g_t, p_{t+1}, v_{t+1})`` (the first two from
#: a copy before the step). A map (5 x 5) takes the slots to the canonical vectors; an absent
#: slot (no velocity) has a zero column.
SLOTS = 5

MapRows = list[list[float]]


def is_low_precision(t: Tensor) -> bool:
    """Whether ``t`` is bfloat16 or float16 (the ledger then measures the update's rounding)."""
    return t.dtype in (torch.bfloat16, torch.float16)


class Hyper(NamedTuple):
    """A param group's hyper-parameters as the ledger reads them.

    Example:

        >>> import torch
        >>> from torch_momentum import PolyakSGD
        >>> from torch_momentum.balance.rules import rule_for
        >>> opt = PolyakSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, maximize=True)
        >>> rule_for(opt).hyper(opt.param_groups[0])
        Hyper(lr=0.1, momentum=0.9, weight_decay=0.0, sign=-1.0, dampening=0.0)
    """

    lr: float
    momentum: float
    weight_decay: float
    sign: float  # -1.0 when maximising, else 1.0
    dampening: float = 0.0


class Maps(NamedTuple):
    r"""How one step of one param group splits into terms (cached by ``key``).

    ``terms`` (6 x 9): the terms (:data:`LEDGER_TERMS`) of a quadratic charge as combinations of
    the Gram entries :data:`GRAM_ENTRIES`; ``linear`` (6 x 5): the terms of a linear charge
    :math:`\langle 1, x\rangle` as combinations of the sums of the canonical vectors.
    ``velocity``, ``plain``, ``low_velocity``, ``low_plain`` (5 x 5): the slots (see
    :data:`SLOTS`) to the canonical vectors, with or without a velocity, at full or low
    precision. ``negate_velocity``: the velocity slots hold the optimiser's buffer, :math:`-v`.

    Example:

        >>> import torch
        >>> from torch_momentum import PolyakSGD
        >>> from torch_momentum.balance.rules import rule_for
        >>> opt = PolyakSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5, momentum=0.5)
        >>> key, build = rule_for(opt).maps(opt, 0, opt.param_groups[0], 0.0, {})
        >>> [row[:3] for row in build().velocity[:4]]  # slots (p1, v1, g) -> x_t, v_t, g_t, dx
        [[1.0, -0.5, 0.0], [0.0, 2.0, 2.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.0]]
    """

    key: tuple[Any, ...]
    terms: list[list[float]]
    linear: list[list[float]]
    velocity: MapRows
    plain: MapRows
    low_velocity: MapRows
    low_plain: MapRows
    negate_velocity: bool

    def slots(self, plain: bool, low: bool) -> MapRows:
        """The slot map for a tensor without a velocity (``plain``) and/or in low precision."""
        if low:
            return self.low_plain if plain else self.low_velocity
        return self.plain if plain else self.velocity


def as_float(value: Any) -> float:
    """A float or a one-element tensor (a host read; a CPU tensor lr costs nothing) as a float."""
    if isinstance(value, Tensor):
        return float(value.detach().reshape(()))
    return float(value)


def term_coefficients(
    eta: float, mu: float, lam: float, c: float, s: float, delta: float
) -> list[list[float]]:
    r"""The six terms of a quadratic charge as combinations of :data:`GRAM_ENTRIES`.

    For the update :math:`\Delta x = \eta\big((\mu - \lambda c) v - s g - \lambda x\big)
    + \delta v` (heavy ball: ``c = delta = 0``; velocity-form Nesterov: ``c`` the look-ahead
    coefficient the gradient was taken with; ``delta``: a move of the implied iterate by
    ``delta * v_t``, counted as momentum, as the built-in Nesterov SGD makes under a changing
    :math:`\eta\mu`). The first-order part :math:`2\langle x, \Delta x\rangle` is split into
    momentum, weight decay and symmetry, with ``other`` the rest (round-off for these rules);
    discretisation is :math:`\langle \Delta x, \Delta x\rangle`; rounding is
    :math:`2\langle x, e\rangle + 2\langle \Delta x, e\rangle + \langle e, e\rangle`.

    Example:

        >>> from torch_momentum.balance.rules import term_coefficients
        >>> term_coefficients(0.1, 0.9, 0.0, 0.0, 1.0, 0.0)[0]  # momentum: 2 eta mu K
        [0.0, 0.18000000000000002, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    a = 2.0 * (eta * mu + delta)
    z = [0.0, 0.0, 0.0]
    return [
        [0.0, a, 0.0, 2.0 * eta * s * c, 0.0, 0.0, *z],  # momentum
        [-2.0 * eta * lam, -2.0 * eta * lam * c, 0.0, 0.0, 0.0, 0.0, *z],  # weight decay
        [0.0, 0.0, -2.0 * eta * s, -2.0 * eta * s * c, 0.0, 0.0, *z],  # symmetry
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, *z],  # discretisation
        [2.0 * eta * lam, -a + 2.0 * eta * lam * c, 2.0 * eta * s, 0.0, 2.0, 0.0, *z],  # other
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.0],  # rounding
    ]


def linear_coefficients(
    eta: float, mu: float, lam: float, c: float, s: float, delta: float
) -> list[list[float]]:
    r"""The six terms of a linear charge :math:`\langle 1, x\rangle` as combinations of the sums
    :math:`\langle 1, \cdot\rangle` of :math:`(x_t, v_t, g_t, \Delta x, e)`, for the update of
    :func:`term_coefficients`. A linear charge has no discretisation term: for any update
    :math:`\langle 1, x + \Delta x\rangle - \langle 1, x\rangle = \langle 1, \Delta x\rangle`.

    Example:

        >>> from torch_momentum.balance.rules import linear_coefficients
        >>> linear_coefficients(0.1, 0.9, 0.0, 0.0, 1.0, 0.0)[2]  # symmetry: -eta <1, g>
        [0.0, 0.0, -0.1, 0.0, 0.0]
    """
    a = eta * mu + delta
    return [
        [0.0, a, 0.0, 0.0, 0.0],  # momentum
        [-eta * lam, -eta * lam * c, 0.0, 0.0, 0.0],  # weight decay
        [0.0, 0.0, -eta * s, 0.0, 0.0],  # symmetry
        [0.0, 0.0, 0.0, 0.0, 0.0],  # discretisation
        [eta * lam, -a + eta * lam * c, eta * s, 1.0, 0.0],  # other
        [0.0, 0.0, 0.0, 0.0, 1.0],  # rounding
    ]


def _pad(rows: MapRows) -> MapRows:
    """Canonical rows over the first slots, padded to :data:`CANONICAL` x :data:`SLOTS`."""
    out = [list(r) + [0.0] * (SLOTS - len(r)) for r in rows]
    return out + [[0.0] * SLOTS for _ in range(CANONICAL - len(out))]


def _momentum_maps(
    builtin_nesterov: bool,
    h: Hyper,
    c0: float,
    c1: float,
) -> tuple[MapRows, MapRows]:
    """``(velocity, plain)`` slot maps of a momentum step, slots ``(p, v_{t+1}, g_t)``.

    ``c0``/``c1``: the look-ahead coefficients before/after the step (parameters
    ``p = x + c v``). ``builtin_nesterov``: the parameters follow ``torch.optim.SGD(nesterov=True)``
    (``p_{t+1} = p_t - eta (d_t - mu v_{t+1})``, ``d_t`` at ``p_t``) rather than the velocity form.
    With dampening ``tau`` (heavy ball only): ``v_{t+1} = mu v_t - (1 - tau) d_t``."""
    eta, mu, lam, s = h.lr, h.momentum, h.weight_decay, h.sign
    # without a velocity: p1 = p0 - eta (s g + lam p0)
    k = 1.0 / (1.0 - eta * lam) if eta * lam != 1.0 else 0.0
    plain = [[k, 0.0, k * eta * s], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0 - k, 0.0, -k * eta * s]]
    if mu == 0.0:
        with_v = [[1.0, -c1 - eta, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, eta, 0.0]]
        return _pad(with_v), _pad(plain)
    x1 = [1.0, -c1, 0.0]
    if builtin_nesterov:
        # p0 = (p1 + eta s g - eta mu v1) / (1 - eta lam); mu v0 = v1 + s g + lam p0
        p0 = [k, -k * eta * mu, k * eta * s]
        v0 = [(lam * p0[0]) / mu, (1.0 + lam * p0[1]) / mu, (s + lam * p0[2]) / mu]
        xs = [p0[j] - c0 * v0[j] for j in range(3)]
        dx = [x1[j] - xs[j] for j in range(3)]
    else:
        # dx = eta v1; mu v0 = v1 + (1 - tau) (s g + lam (x0 + c0 v0))
        xs = [x1[0], x1[1] - eta, x1[2]]
        dx = [0.0, eta, 0.0]
        lam_d, s_d = (1.0 - h.dampening) * lam, (1.0 - h.dampening) * s
        den = mu - lam_d * c0
        v0 = [lam_d * xs[0] / den, (1.0 + lam_d * xs[1]) / den, (s_d + lam_d * xs[2]) / den]
    return _pad([xs, v0, [0.0, 0.0, 1.0], dx]), _pad(plain)


def _low_maps(h: Hyper, c0: float, c1: float, delta: float) -> tuple[MapRows, MapRows]:
    r"""``(velocity, plain)`` slot maps at low precision, slots ``(p_t, v_t, g_t, p_{t+1},
    v_{t+1})``: :math:`x_t = p_t - c_0 v_t`, :math:`\Delta x` the exact update of the rule from
    :math:`(x_t, v_t, g_t)`, :math:`e = (p_{t+1} - c_1 v_{t+1}) - x_t - \Delta x`."""
    eta_d = h.lr * (1.0 - h.dampening)
    a_x, a_g = -eta_d * h.weight_decay, -eta_d * h.sign
    a_v = h.lr * h.momentum - eta_d * h.weight_decay * c0 + delta
    x = [1.0, -c0, 0.0, 0.0, 0.0]
    dx = [a_x, a_v - a_x * c0, a_g, 0.0, 0.0]
    e = [-1.0 - dx[0], c0 - dx[1], -dx[2], 1.0, -c1]
    velocity = [x, [0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], dx, e]
    # without a velocity (no momentum, so no dampening either): p1 = p0 - eta (s g + lam p0)
    px = [1.0, 0.0, 0.0, 0.0, 0.0]
    pdx = [-h.lr * h.weight_decay, 0.0, -h.lr * h.sign, 0.0, 0.0]
    pe = [-1.0 - pdx[0], 0.0, -pdx[2], 1.0, 0.0]
    plain = [px, [0.0] * SLOTS, [0.0, 0.0, 1.0, 0.0, 0.0], pdx, pe]
    return velocity, plain


class Rule:
    r"""How one optimiser family's step splits into ledger terms; subclasses override.

    The base class is the generic split (any optimiser): the ledger copies the parameters before
    each step (slots ``(x_t, p_{t+1}, g_t)``, :math:`\Delta x = p_{t+1} - x_t`), symmetry is the
    gradient's share :math:`-2\eta s R_t` and the rest of the first-order part is ``other``.

    Attributes:
        velocity_key: the optimiser-state key of the velocity (``None``: no velocity).
        velocity_sign: ``v = velocity_sign * state[velocity_key]`` in the velocity-form sign
            convention
            (:math:`v_{t+1} = \mu v_t - d_t`).
        pre_step: whether the ledger must look at the optimiser before each step (a look-ahead
            coefficient or a copy of the parameters) even at full precision.

    Example:

        >>> import torch
        >>> from torch_momentum.balance.rules import Rule, rule_for
        >>> opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
        >>> type(rule_for(opt)) is Rule, rule_for(opt).known(opt.param_groups[0])
        (True, False)
    """

    velocity_key: str | None = None
    velocity_sign: float = 1.0
    pre_step: bool = True

    def known(self, group: dict[str, Any]) -> bool:
        """Whether this rule explains the group's update (else the generic split is used)."""
        return False

    def hyper(self, group: dict[str, Any]) -> Hyper:
        """The group's hyper-parameters (momentum and weight decay 0 for the generic split)."""
        s = -1.0 if group.get("maximize", False) else 1.0
        lr = as_float(group.get("lr", 0.0))
        if not self.known(group):
            return Hyper(lr, 0.0, 0.0, s)
        damp = float(group.get("dampening", 0.0))
        return Hyper(lr, float(group["momentum"]), float(group["weight_decay"]), s, damp)

    def nesterov(self, group: dict[str, Any]) -> bool:
        """Whether the group's gradient is taken at a look-ahead point."""
        return False

    def lookahead(
        self, opt: torch.optim.Optimizer, index: int, memory: MutableMapping[Any, float]
    ) -> float:
        """The coefficient ``c`` with parameters ``= x + c v`` now (0 without a look-ahead).

        ``memory`` is the ledger's per-optimiser record (saved in its state), for rules whose
        optimiser does not keep the coefficient itself."""
        return 0.0

    def record(
        self, opt: torch.optim.Optimizer, index: int, memory: MutableMapping[Any, float]
    ) -> None:
        """After a step of group ``index``: keep in ``memory`` what :meth:`lookahead` needs
        later (nothing unless the optimiser does not keep its coefficient itself)."""

    def velocity(self, opt: torch.optim.Optimizer, p: Tensor) -> Tensor | None:
        """The velocity of ``p`` in the velocity-form sign convention, or ``None``."""
        if self.velocity_key is None:
            return None
        v = opt.state.get(p, {}).get(self.velocity_key)
        if v is None or self.velocity_sign == 1.0:
            return v
        return v * self.velocity_sign

    def iterate(
        self, opt: torch.optim.Optimizer, index: int, p: Tensor, memory: MutableMapping[Any, float]
    ) -> Tensor:
        r"""The iterate :math:`x_t` of ``p`` (``p`` itself, detached, when it is the iterate); of a
        bfloat16/float16 ``p`` in float64: :math:`y - c\,v` rounded to ``p``'s dtype is not the
        iterate the terms are booked at."""
        c = self.lookahead(opt, index, memory)
        v = self.velocity(opt, p) if c != 0.0 else None
        if v is None:
            return p.detach()
        if is_low_precision(p):
            return p.detach().double() - c * v.double()
        return p.detach() - c * v

    def fresh(self, group: dict[str, Any]) -> bool:
        """Whether a tensor's first step (no velocity before it) needs maps of its own
        (``first_step=True`` in :meth:`maps`)."""
        return False

    def maps(
        self,
        opt: torch.optim.Optimizer,
        index: int,
        group: dict[str, Any],
        c0: float,
        memory: MutableMapping[Any, float],
        first_step: bool = False,
    ) -> tuple[tuple[Any, ...], Callable[[], Maps]]:
        """After the step: ``(key, build)``, ``build()`` giving the :class:`Maps` of the key (the
        ledger caches them by key; a scheduler changes the key every step). ``c0``: the
        look-ahead coefficient before the step; ``first_step``: the tensor had no velocity
        before this step (asked only where :meth:`fresh` says it matters)."""
        h = self.hyper(group)
        key = ("generic", h.lr, h.sign)

        def build() -> Maps:
            cmap = _pad([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 1.0, 0.0]])
            terms = term_coefficients(h.lr, 0.0, 0.0, 0.0, h.sign, 0.0)
            linear = linear_coefficients(h.lr, 0.0, 0.0, 0.0, h.sign, 0.0)
            return Maps(key, terms, linear, cmap, cmap, cmap, cmap, False)

        return key, build

    def corrected(self, group: dict[str, Any]) -> bool:
        """Whether the momentum-corrected balance :math:`Q_t` applies (heavy ball, constant
        hyper-parameters, no dampening)."""
        return False


#: The generic split, for optimisers without a rule of their own.
Generic = Rule


class HeavyBall(Rule):
    """Heavy ball with the velocity in the optimiser's state (:class:`~torch_momentum.PolyakSGD`).

    The post-step parameter, velocity and gradient determine the pre-step iterate and velocity
    exactly, so the ledger needs nothing before the step (except copies of low-precision
    tensors, whose rounding it measures).

    Args:
        velocity_key: the state key of the velocity (default ``"velocity"``).
        velocity_sign: ``v = velocity_sign * state[velocity_key]`` (``-1`` for a buffer holding
            :math:`-v`, as ``torch.optim.SGD``'s ``momentum_buffer``).

    Example:

        >>> import torch
        >>> from torch_momentum import PolyakSGD
        >>> from torch_momentum.balance.rules import HeavyBall, rule_for
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> opt = PolyakSGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones(1); _ = opt.step()
        >>> isinstance(rule_for(opt), HeavyBall), rule_for(opt).velocity(opt, p)
        (True, tensor([-1.]))
    """

    pre_step = False

    def __init__(self, velocity_key: str = "velocity", velocity_sign: float = 1.0) -> None:
        if velocity_sign not in (1.0, -1.0):
            raise ValueError(f"`velocity_sign` must be 1 or -1, got {velocity_sign!r}")
        self.velocity_key = velocity_key
        self.velocity_sign = float(velocity_sign)

    def known(self, group: dict[str, Any]) -> bool:
        return True

    def maps(
        self,
        opt: torch.optim.Optimizer,
        index: int,
        group: dict[str, Any],
        c0: float,
        memory: MutableMapping[Any, float],
        first_step: bool = False,
    ) -> tuple[tuple[Any, ...], Callable[[], Maps]]:
        return self._maps(self.hyper(group), False, 0.0, 0.0, 0.0)

    def _maps(
        self, h: Hyper, builtin: bool, c0: float, c1: float, delta: float
    ) -> tuple[tuple[Any, ...], Callable[[], Maps]]:
        negate = self.velocity_sign == -1.0
        key = (type(self), negate, builtin, *h, c0, c1, delta)

        def build() -> Maps:
            # dampening tau scales the gradient and decay terms by (1 - tau); the momentum
            # coefficient eta mu is carried by delta (no division by 1 - tau)
            eta_d = h.lr * (1.0 - h.dampening)
            extra = delta + h.lr * h.momentum - eta_d * h.momentum
            coef = (eta_d, h.momentum, h.weight_decay, c0, h.sign, extra)
            velocity, plain = _momentum_maps(builtin, h, c0, c1)
            low_velocity, low_plain = _low_maps(h, c0, c1, delta)
            return Maps(
                key,
                term_coefficients(*coef),
                linear_coefficients(*coef),
                velocity,
                plain,
                low_velocity,
                low_plain,
                negate,
            )

        return key, build

    def corrected(self, group: dict[str, Any]) -> bool:
        return not self.nesterov(group) and float(group.get("dampening", 0.0)) == 0.0


class Nesterov(HeavyBall):
    r"""Velocity-form Nesterov (:class:`~torch_momentum.NesterovSGD`): the parameters hold the
    look-ahead :math:`y = x + c\,v` with the coefficient the optimiser reports.

    Example:

        >>> import torch
        >>> from torch_momentum import NesterovSGD
        >>> from torch_momentum.balance.rules import rule_for
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> opt = NesterovSGD([p], lr=0.5, momentum=0.5)
        >>> p.grad = torch.ones(1); _ = opt.step()
        >>> rule = rule_for(opt)
        >>> rule.lookahead(opt, 0, {}), rule.iterate(opt, 0, p, {})  # x_1 = 1 - 0.5
        (0.25, tensor([0.5000]))
    """

    pre_step = True

    def nesterov(self, group: dict[str, Any]) -> bool:
        return True

    def lookahead(
        self, opt: torch.optim.Optimizer, index: int, memory: MutableMapping[Any, float]
    ) -> float:
        return as_float(cast(NesterovSGD, opt).lookahead_coefficient(index))

    def iterate(
        self, opt: torch.optim.Optimizer, index: int, p: Tensor, memory: MutableMapping[Any, float]
    ) -> Tensor:
        if is_low_precision(p):  # exact, not rounded to p's dtype
            return super().iterate(opt, index, p, memory)
        return cast(NesterovSGD, opt).iterate(p)

    def maps(
        self,
        opt: torch.optim.Optimizer,
        index: int,
        group: dict[str, Any],
        c0: float,
        memory: MutableMapping[Any, float],
        first_step: bool = False,
    ) -> tuple[tuple[Any, ...], Callable[[], Maps]]:
        c1 = self.lookahead(opt, index, memory)
        return self._maps(self.hyper(group), False, c0, c1, 0.0)


class TorchSGD(HeavyBall):
    r"""``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize).

    Its buffer is :math:`-v`. With ``nesterov=True`` its parameters are the look-ahead
    :math:`y = x + \eta\mu v` built with the :math:`\eta\mu` of the previous step (remembered in
    the ledger's ``memory``); when :math:`\eta\mu` changes, its implied iterate moves by
    :math:`(c_t - \eta\mu)v_t`, counted as momentum. With dampening :math:`\tau`,
    :math:`v_{t+1} = \mu v_t - (1 - \tau) d_t`, except at a tensor's first step, where the
    built-in sets :math:`v_1 = -d_0`.

    Example:

        >>> import torch
        >>> from torch_momentum.balance.rules import rule_for
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones(1); _ = opt.step()
        >>> rule_for(opt).velocity(opt, p)  # v = -momentum_buffer
        tensor([-1.])
    """

    pre_step = True

    def __init__(self) -> None:
        super().__init__("momentum_buffer", -1.0)

    def nesterov(self, group: dict[str, Any]) -> bool:
        return bool(group.get("nesterov", False))

    def fresh(self, group: dict[str, Any]) -> bool:
        return float(group.get("dampening", 0.0)) != 0.0

    def lookahead(
        self, opt: torch.optim.Optimizer, index: int, memory: MutableMapping[Any, float]
    ) -> float:
        group = opt.param_groups[index]
        if not self.nesterov(group):
            return 0.0
        key = (id(opt), index)
        if key not in memory:
            memory[key] = as_float(group["lr"]) * float(group["momentum"])
        return memory[key]

    def record(
        self, opt: torch.optim.Optimizer, index: int, memory: MutableMapping[Any, float]
    ) -> None:
        r"""The parameters just built hold :math:`y = x + \eta\mu v` with this step's
        :math:`\eta\mu`, which a scheduler may change before the next."""
        group = opt.param_groups[index]
        if self.nesterov(group):
            memory[(id(opt), index)] = as_float(group["lr"]) * float(group["momentum"])

    def maps(
        self,
        opt: torch.optim.Optimizer,
        index: int,
        group: dict[str, Any],
        c0: float,
        memory: MutableMapping[Any, float],
        first_step: bool = False,
    ) -> tuple[tuple[Any, ...], Callable[[], Maps]]:
        h = self.hyper(group)
        if first_step:  # v_1 = -d_0: gradient descent from v_0 = 0, no dampening
            h = h._replace(momentum=0.0, dampening=0.0)
        if not self.nesterov(group):
            return self._maps(h, False, 0.0, 0.0, 0.0)
        c1 = h.lr * h.momentum
        memory[(id(opt), index)] = c1
        return self._maps(h, True, c0, c1, c0 - c1)


_REGISTRY: dict[type, tuple[Rule, bool]] = {}


def register_rule(
    optimizer_type: type[torch.optim.Optimizer], rule: Rule, *, subclasses: bool = True
) -> None:
    """Use ``rule`` for optimisers of ``optimizer_type`` (and its subclasses unless
    ``subclasses=False``: a subclass may change the update).

    Raises:
        TypeError: ``optimizer_type`` is not an Optimizer class or ``rule`` not a :class:`Rule`.

    Example:

        >>> import torch
        >>> from torch_momentum.balance.rules import HeavyBall, register_rule, rule_for
        >>> class MySGD(torch.optim.SGD):  # keeps torch.optim.SGD's momentum_buffer = -v
        ...     pass
        >>> register_rule(MySGD, HeavyBall("momentum_buffer", velocity_sign=-1.0))
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> type(rule_for(MySGD([p], lr=0.1, momentum=0.9))).__name__
        'HeavyBall'
    """
    if not (isinstance(optimizer_type, type) and issubclass(optimizer_type, torch.optim.Optimizer)):
        raise TypeError(f"`optimizer_type` must be an Optimizer class, got {optimizer_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"`rule` must be a torch_momentum.balance.rules.Rule, got {rule!r}")
    _REGISTRY[optimizer_type] = (rule, subclasses)


def rule_for(optimizer: torch.optim.Optimizer) -> Rule:
    """The rule of ``optimizer``: the registered rule of its class, or of the nearest base class
    registered with ``subclasses=True``; the generic split otherwise.

    Example:

        >>> import torch
        >>> from torch_momentum import NesterovSGD
        >>> from torch_momentum.balance.rules import rule_for
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> [type(rule_for(o)).__name__ for o in (NesterovSGD([p]), torch.optim.Adam([p]))]
        ['Nesterov', 'Rule']
    """
    cls = type(optimizer)
    for base in cls.__mro__:
        entry = _REGISTRY.get(base)
        if entry is not None and (base is cls or entry[1]):
            return entry[0]
    return GENERIC_RULE


#: The generic split (:class:`Rule` holds no state, so one instance serves every optimiser):
#: :func:`rule_for`'s answer for an optimiser without a registered rule, and the ledger's for a
#: param group that its optimiser's rule does not explain (:meth:`Rule.known` false).
GENERIC_RULE = Rule()
register_rule(PolyakSGD, HeavyBall())
register_rule(NesterovSGD, Nesterov())
register_rule(torch.optim.SGD, TorchSGD(), subclasses=False)
