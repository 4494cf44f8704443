"""Reading a traced program for what it computes below float64: :func:`first_narrow`.

``badnet_jax.models.flax_checks`` traces a Flax module's method in float64 and asks for the first operation that
computes, from values that depend on the method's input, something narrower than float64 that reaches the
method's outputs. Two flows decide it, both followed through calls, branches and loops:

* **What depends on the input** (forward): an operation's output does when one of its operands does; a call's,
  a branch's or a loop's outputs when the sub-program's do, a loop's carries followed to a fixpoint (a carry
  that holds the input only from the second iteration on holds it).
* **What reaches the outputs** (backward): a value computed and dropped, sown into a collection that is not
  kept, or printed (``jax.debug.print``) is not the network's; a loop's carry is needed when a needed value of
  the body or the loop's condition reads it.

Narrow is a dtype below float64 / complex128 computed from the input (exact casts of booleans and small
integers aside; a value that is only moved or selected, a float32 weight chosen by the input, is judged where it
was made), a ``reduce_precision`` below float64's bits, a dot or convolution algorithm below float64, and any
operation whose precision the program does not show (:data:`OPAQUE`). A loop whose number of steps the input
decides makes every carry read the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
from jax.extend.core import Literal, jaxprs_in_params
import jax.numpy as jnp

WIDE = (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
FLOAT64_EXPONENT_BITS, FLOAT64_MANTISSA_BITS = 11, 52

# Operations whose values the program does not show: host code, a foreign function, a value's bits read as
# another type (zeroing a float64's low mantissa bits keeps its dtype), a write into a mutable array (what reads
# it later is not an operand of the write). Their precision cannot be checked.
OPAQUE = {"pure_callback": "runs host code", "io_callback": "runs host code", "ffi_call": "calls a foreign function",
          "bitcast_convert_type": "reads its values' bits as another type",
          "swap": "writes into a mutable array", "addupdate": "writes into a mutable array"}
# jnp's float64-exact functions whose jitted bodies read their values' bits: trusted by name.
EXACT_BIT_FUNCTIONS = frozenset({"signbit", "copysign", "frexp", "ldexp"})
# Effects that change nothing the network computes.
INERT_EFFECTS = frozenset({"debug_print", "debug_callback"})
# Operations whose one sub-program is called on their operands, in order, and gives their outputs. Any other
# operation's sub-programs (a reduction's combiner, a sort's comparator) see values the operands do not name:
# every input of theirs is taken as reading the input.
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call",
                   "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map"})
# Operations that only move or select their operands' values: a narrow value among their outputs was computed
# (and checked) where it was made, e.g. a float32 weight selected by the input (``jnp.where``, a gather).
MOVES = frozenset({"select_n", "gather", "dynamic_slice", "dynamic_update_slice", "slice", "concatenate", "pad",
                   "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "rev", "copy", "copy_p",
                   "optimization_barrier"})


def first_narrow(jaxpr: Any, reads: set) -> Optional[str]:
    """What the first operation of ``jaxpr`` that computes below float64 from the variables in ``reads`` (those
    that depend on the input) does, if its values reach the outputs: e.g. ``computes in float32
    (convert_element_type)``; None if there is none."""
    return _narrow(jaxpr, set(reads), [True] * len(jaxpr.outvars), False)


def _in(v: Any, vars_: set) -> bool:
    return not isinstance(v, Literal) and v in vars_


def _subprograms(eqn: Any) -> list:
    """The sub-programs of an equation (calls' bodies, branches, loops' bodies, combiners), as open jaxprs."""
    return [s.jaxpr if hasattr(s, "jaxpr") else s for s in jaxprs_in_params(eqn.params)]


def _called(eqn: Any, subs: list) -> Optional[Any]:
    """The one sub-program (of ``subs``, the equation's) a call (:data:`CALLS`) runs on its operands, in order,
    giving its outputs; None for any other equation, or a call whose sub-program matches neither."""
    if eqn.primitive.name in CALLS and len(subs) == 1 and len(subs[0].invars) == len(eqn.invars) \
            and len(subs[0].outvars) == len(eqn.outvars):
        return subs[0]
    return None


def _branches(eqn: Any, subs: list) -> Optional[list]:
    """A ``cond``'s branches (``subs``), each taking its operands but the index and giving its outputs; None
    otherwise."""
    if eqn.primitive.name == "cond" and subs and all(
            len(s.invars) == len(eqn.invars) - 1 and len(s.outvars) == len(eqn.outvars) for s in subs):
        return subs
    return None


def _while_need(eqn: Any, outs_needed: Sequence[bool]) -> tuple[set, list[bool]]:
    """A while loop's condition's needed variables, and its carries needed for the outputs flagged in
    ``outs_needed`` or read by the condition."""
    nc, cond = eqn.params["cond_nconsts"], eqn.params["cond_jaxpr"].jaxpr
    _, cond_needed = _needed(cond, [True])
    return cond_needed, [n or v in cond_needed for n, v in zip(outs_needed, cond.invars[nc:])]


def _needed(jaxpr: Any, needed_out: Sequence[bool]) -> tuple[set, set]:
    """The equations (by position) whose values reach the outputs flagged in ``needed_out`` or that have effects
    other than a print, and the variables those equations read (or the flagged outputs are): of a call, a loop or
    a branch, only the operands its sub-programs read for what is needed of it."""
    needed = {v for v, n in zip(jaxpr.outvars, needed_out) if n and not isinstance(v, Literal)}
    live = set()
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        outs = [v in needed for v in eqn.outvars]
        if any(outs) or _effects(eqn):
            live.add(i)
            uses = _operands_needed(eqn, outs) or [True] * len(eqn.invars)
            needed.update(v for v, n in zip(eqn.invars, uses) if n and not isinstance(v, Literal))
    return live, needed


def _effects(eqn: Any) -> bool:
    """Whether an equation has effects other than a print's (``jax.debug.print``, inside a call or not)."""
    if eqn.primitive.name in INERT_EFFECTS:
        return False
    return any("Debug" not in type(effect).__name__ for effect in eqn.effects)


def _operands_needed(eqn: Any, outs_needed: list[bool]) -> Optional[list[bool]]:
    """Which operands of a call, a loop or a branch its sub-programs read for the outputs flagged in
    ``outs_needed`` (and for their effects); None for any other equation (all its operands)."""
    ops, params, name = list(eqn.invars), eqn.params, eqn.primitive.name
    if _effects(eqn):
        return None
    if name == "scan":
        body, nc, nk = params["jaxpr"].jaxpr, params["num_consts"], params["num_carry"]
        _, inside = _loop_needed(body, outs_needed, nc, nk)
        # A needed carry's first value is its last when the loop runs no step.
        return [v in inside or (nc <= i < nc + nk and outs_needed[i - nc]) for i, v in enumerate(body.invars)]
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        body, cond = params["body_jaxpr"].jaxpr, params["cond_jaxpr"].jaxpr
        cond_needed, need = _while_need(eqn, outs_needed)
        _, inside = _loop_needed(body, need, nb, len(need))
        return ([v in cond_needed for v in cond.invars[:nc]] + [v in inside for v in body.invars[:nb]]
                + [a or v in inside for a, v in zip(need, body.invars[nb:])])
    subs = _subprograms(eqn)
    branches, called = _branches(eqn, subs), _called(eqn, subs)
    if branches:
        uses = [False] * (len(ops) - 1)
        for branch in branches:
            inside = _needed(branch, outs_needed)[1]
            uses = [u or v in inside for u, v in zip(uses, branch.invars)]
        return [True] + uses
    if called is not None:
        inside = _needed(called, outs_needed)[1]
        return [v in inside for v in called.invars]
    return None


def _loop_needed(body: Any, outs_needed: Sequence[bool], first_carry: int,
                 num_carry: int) -> tuple[list[bool], set]:
    """The outputs of a loop's body that are needed, those flagged in ``outs_needed`` and each carry that a needed
    value reads (to a fixpoint), and the body's variables they need."""
    carry_in, need = body.invars[first_carry:first_carry + num_carry], list(outs_needed)
    while True:
        _, inside = _needed(body, need)
        more = [n or (j < num_carry and carry_in[j] in inside) for j, n in enumerate(need)]
        if more == need:
            return need, inside
        need = more


def _narrow(jaxpr: Any, reads: set, needed_out: Sequence[bool], bits_ok: bool) -> Optional[str]:
    """:func:`first_narrow` for the outputs flagged in ``needed_out``; ``reads`` grows with what depends on the
    input; ``bits_ok``: inside one of :data:`EXACT_BIT_FUNCTIONS`."""
    live, needed = _needed(jaxpr, needed_out)
    for i, eqn in enumerate(jaxpr.eqns):
        if i not in live or not any(_in(v, reads) for v in eqn.invars):
            continue
        outs_needed = [v in needed for v in eqn.outvars]
        found, out_reads = _inside(eqn, reads, outs_needed, bits_ok)
        found = found or _narrow_op(eqn, bits_ok)
        if found:
            return found
        # A sub-program's outputs were checked where it computed them; moved values where they were made.
        made_here = not _subprograms(eqn) and eqn.primitive.name not in MOVES and not _exact_cast(eqn)
        for v, r, n in zip(eqn.outvars, out_reads or [True] * len(eqn.outvars), outs_needed):
            if not r:
                continue
            reads.add(v)
            dtype = jnp.dtype(v.aval.dtype) if hasattr(v.aval, "dtype") else None
            if n and made_here and dtype is not None and jnp.issubdtype(dtype, jnp.inexact) and dtype not in WIDE:
                return f"computes in {dtype} ({eqn.primitive.name})"
    return None


def _narrow_op(eqn: Any, bits_ok: bool) -> Optional[str]:
    """What one operation (its sub-programs aside) does below float64 whatever its output dtype, or None."""
    name, params = eqn.primitive.name, eqn.params
    if name == "reduce_precision" and (params["exponent_bits"] < FLOAT64_EXPONENT_BITS
                                       or params["mantissa_bits"] < FLOAT64_MANTISSA_BITS):
        return f"computes in {params['exponent_bits']} exponent and {params['mantissa_bits']} mantissa bits ({name})"
    if name in OPAQUE and not (bits_ok and name == "bitcast_convert_type"):
        return f"{OPAQUE[name]} ({name}), whose precision badnet-jax cannot check,"
    algorithm = params.get("precision") if name in ("dot_general", "conv_general_dilated") else None
    if isinstance(algorithm, jax.lax.DotAlgorithmPreset):
        narrow = algorithm not in (jax.lax.DotAlgorithmPreset.DEFAULT, jax.lax.DotAlgorithmPreset.F64_F64_F64)
    elif isinstance(algorithm, jax.lax.DotAlgorithm):
        types = (algorithm.lhs_precision_type, algorithm.rhs_precision_type, algorithm.accumulation_type)
        narrow = any(jnp.dtype(t) not in WIDE for t in types)
    else:
        narrow = False  # None or lax.Precision: the operands' own dtype on a CPU (the settling's device)
    return f"computes with the algorithm {algorithm} ({name})" if narrow else None


def _exact_cast(eqn: Any) -> bool:
    """A conversion of booleans or of integers that the target dtype holds exactly (a 0/1 mask, int8 values
    into float32): no rounding, whatever the dtype."""
    if eqn.primitive.name != "convert_element_type" or not hasattr(eqn.invars[0].aval, "dtype"):
        return False
    src, dst = jnp.dtype(eqn.invars[0].aval.dtype), jnp.dtype(eqn.outvars[0].aval.dtype)
    if src == jnp.bool_:
        return True
    return jnp.issubdtype(src, jnp.integer) and jnp.issubdtype(dst, jnp.floating) \
        and jnp.iinfo(src).bits - jnp.issubdtype(src, jnp.signedinteger) <= jnp.finfo(dst).nmant + 1


def _exact_bit_function(eqn: Any) -> bool:
    """Whether a call is one of :data:`EXACT_BIT_FUNCTIONS`: its name, and its program the one jnp's function
    traces on the same operands (a function of the user's own under that name is not trusted)."""
    name = eqn.params.get("name")
    if eqn.primitive.name not in ("jit", "pjit") or name not in EXACT_BIT_FUNCTIONS:
        return False
    specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type) for v in eqn.invars]
    with jax.enable_x64(True):
        reference = jax.make_jaxpr(getattr(jnp, name))(*specs).jaxpr.eqns
    return len(reference) == 1 and str(reference[0].params.get("jaxpr")) == str(eqn.params.get("jaxpr"))


def _reading(inner: Any, outer: Sequence[Any], reads: set) -> set:
    """The inputs of a sub-program whose operands in the equation (``outer``, in order) read the input."""
    return {i for i, o in zip(inner.invars, outer) if _in(o, reads)}


def _inside(eqn: Any, reads: set, outs_needed: list[bool], bits_ok: bool) -> tuple[Optional[str], Optional[list]]:
    """The sub-programs of an equation that reads the input: (what narrow was found, which of the equation's
    outputs read the input). The outputs are None where the equation has no sub-program, or where its
    sub-programs cannot be matched to its operands and outputs (then all their inputs are taken as reading the
    input, all their outputs as needed)."""
    ops, params, name = list(eqn.invars), eqn.params, eqn.primitive.name
    if name == "scan":
        num_consts, num_carry = params["num_consts"], params["num_carry"]
        found, out_reads, _ = _loop(params["jaxpr"].jaxpr, ops, reads, outs_needed, num_consts, num_carry, bits_ok)
        return found, out_reads
    if name == "while":
        return _while(eqn, reads, outs_needed, bits_ok)
    subs = _subprograms(eqn)
    branches, inner = _branches(eqn, subs), _called(eqn, subs)
    if not subs:
        return None, None
    if branches:
        out_reads = [_in(ops[0], reads)] * len(eqn.outvars)  # a branch chosen by the input: every output reads it
        for branch in branches:
            inside = _reading(branch, ops[1:], reads)
            found = _narrow(branch, inside, outs_needed, bits_ok)
            if found:
                return found, None
            out_reads = [r or _in(v, inside) for r, v in zip(out_reads, branch.outvars)]
        return None, out_reads
    if inner is not None:  # a call: jit, remat, a custom derivative's primal
        trusted = bits_ok or _exact_bit_function(eqn)
        inside = _reading(inner, ops, reads)
        found = _narrow(inner, inside, outs_needed, trusted)
        return found, None if found else [_in(v, inside) for v in inner.outvars]
    for inner in subs:
        found = _narrow(inner, set(inner.invars), [True] * len(inner.outvars), bits_ok)
        if found:
            return found, None
    return None, None


def _loop(body: Any, outer: Sequence[Any], reads: set, outs_needed: Sequence[bool], first_carry: int,
          num_carry: int, bits_ok: bool, every_carry: bool = False) -> tuple[Optional[str], Optional[list], set]:
    """:func:`_narrow` on a loop's body (its outputs: the carries, then anything else, as the loop's), both flows
    followed around the loop to a fixpoint: a carry whose new value reads the input reads it, and a carry that a
    needed value reads is needed. Returns (what narrow was found, which outputs read the input, the body's
    inputs that read it). ``every_carry``: every carry reads the input from the first step on."""
    carry_in = body.invars[first_carry:first_carry + num_carry]
    need, _ = _loop_needed(body, outs_needed, first_carry, num_carry)
    start = _reading(body, outer, reads) | (set(carry_in) if every_carry else set())
    while True:
        inside = set(start)
        found = _narrow(body, inside, need, bits_ok)
        if found:
            return found, None, start
        carried = {v for v, out in zip(carry_in, body.outvars) if _in(out, inside)}
        if carried <= start:
            # A carry's final value is its first when the loop runs no step.
            out_reads = [_in(v, inside) or (j < num_carry and carry_in[j] in start)
                         for j, v in enumerate(body.outvars)]
            return None, out_reads, start
        start = start | carried


def _while(eqn: Any, reads: set, outs_needed: list[bool], bits_ok: bool) -> tuple[Optional[str], Optional[list]]:
    """:func:`_inside` for a while loop: its body through :func:`_loop`, with the carries its condition reads
    needed; the condition with the carries that read the input. A condition that reads the input decides how
    many steps run: every carry then reads it."""
    ops, params = list(eqn.invars), eqn.params
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    body, cond = params["body_jaxpr"].jaxpr, params["cond_jaxpr"].jaxpr
    _, need = _while_need(eqn, outs_needed)
    found, out_reads, start = _loop(body, ops[nc:], reads, need, nb, len(need), bits_ok)
    if found:
        return found, None
    cond_reads = _reading(cond, ops[:nc], reads) | {c for c, b in zip(cond.invars[nc:], body.invars[nb:]) if b in start}
    found = _narrow(cond, cond_reads, [True], bits_ok)
    if found or not _in(cond.outvars[0], cond_reads):
        return found, None if found else out_reads
    # The input decides how many steps run: every carry reads it, from the first step on.
    found, _, _ = _loop(body, ops[nc:], reads, need, nb, len(need), bits_ok, every_carry=True)
    found = found or _narrow(cond, _reading(cond, ops[:nc], reads) | set(cond.invars[nc:]), [True], bits_ok)
    return found, None if found else [True] * len(out_reads)
